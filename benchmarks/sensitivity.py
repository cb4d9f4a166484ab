"""Sensitivity, mixed precision and auto calibration on MobileNetV2 (issue 14), markdown + JSON.

    OPENBLAS_NUM_THREADS=1 python benchmarks/sensitivity.py                 # everything
    python benchmarks/sensitivity.py --skip-autocal --json sens.json
    python benchmarks/sensitivity.py --analysis out/mobilenetv2_fp32_sensitivity.json   # reuse an analysis
    python benchmarks/sensitivity.py --only-analyze                         # point 1 alone
    OMP_NUM_THREADS=1 python benchmarks/sensitivity.py --only-mixed --ptq ptq_int8 --no-int4 --max-evaluations 160

First 100 ImageNet dev images calibrate (IFMR + ARQ, AMCT's PTQ), the other 150 evaluate.

1. ``analyze``: time against one float run of the calibration data (the bound is L + 2 such runs).
2. The ranking is informative: output SQNR on the 150 images with the 3 top-ranked layers kept float
   against 3 random layers (mean of 10 draws, seed 0), by AMCT's cosine ranking and by output effect.
3. ``mixed_precision`` (Pareto front on 16 calibration images): the best point within 1.2x the
   all-INT8 bitops, re-measured on the 150 images (SQNR, top-1 agreement); JSON and PNG written.
   ``--only-mixed`` does only this, and builds the best point (its ``best_match_layers``) with the
   full PTQ, lowered to fakequant / qdq / ascend, measuring the fake-quant and QDQ models. With
   ``--ptq ptq_int8`` the PTQ is ``pipelines/ptq_int8.yaml``'s (bias correction included) and the
   search measures against the float model (``mixed_precision{reference}``).
4. ``auto_calibrate`` (BinarySearch, budget: top-1 at most 0.5 points below float on the 150 images,
   ``imagenet_evaluator.Top1Evaluator``) through the CLI; then the same command killed (SIGKILL) after
   its first evaluation and restarted: the final config must be byte-identical.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from imagenet_evaluator import SHARED, imagenet  # noqa: E402

MODEL = SHARED / "models" / "mobilenetv2_fp32.onnx"
PTQ = "fuse_bn,match_layers,calibrate{algorithm=ifmr},quantize_weights{algorithm=arq}"   # AMCT's PTQ


def _session():
    from amct_pipeline.session import Session
    return Session(load_entrypoints=False)


def _float_run_seconds(model, x: np.ndarray, batch: int = 16) -> float:
    from amct_pipeline.runtime.ort import make_session
    session = make_session(model)
    name = session.get_inputs()[0].name
    session.run(None, {name: x[:batch]})
    start = time.perf_counter()
    for i in range(0, len(x), batch):
        session.run(None, {name: x[i:i + batch]})
    return time.perf_counter() - start


def prepare(work: Path, analysis_file: str | None, max_evaluations: int, ptq: str, mixed: bool = True,
            int4: bool = True):
    """PTQ artifacts, the analysis (timed) and the mixed-precision search."""
    from amct_pipeline.passes.base import Pass, PassResult
    calib, _ = imagenet(0, 100)
    session = _session()
    given = json.loads(Path(analysis_file).read_text()) if analysis_file else None

    class GivenAnalysis(Pass):                       # embedding: hand a stored analysis to the pipeline
        name, produces = "given_analysis", frozenset({"sensitivity"})

        def run(self, graph, ctx):
            ctx.artifacts["sensitivity"] = given
            return PassResult(False)
    session.register_pass(GivenAnalysis)
    analyze = "given_analysis" if given else "analyze{max_samples=16}"
    text = f"{ptq},{analyze}"
    if mixed:
        text += f",mixed_precision{{max_samples=16 max_evaluations={max_evaluations}}}"
        if ptq == "ptq_int8":
            text = _search_spec(analyze, max_evaluations, int4)
    from amct_pipeline.pipeline.instruments import Timing
    timing = Timing()
    result = session.build(text, datasets=["calib"]).run(str(MODEL), datasets={"calib": _batches(calib)},
                                                         output_dir=str(work), progress=True, instruments=[timing])
    timings = {f"{label.split(':')[1]}_s": round(seconds, 2) for label, seconds in timing.times}
    timings["float_run_of_calibration_data_s"] = round(_float_run_seconds(result.model, calib), 2)
    return result, timings


def _float_model():
    """The reference: the float model as given (bias correction shifts the pipeline's graph on purpose)."""
    import onnx
    return onnx.load(str(MODEL))


def _batches(x: np.ndarray, batch: int = 16):
    return [{"input": x[i:i + batch]} for i in range(0, len(x), batch)]


def _ptq_int8_passes(bias_correction: bool) -> list[dict]:
    """The default INT8 pipeline's passes before lowering (``pipelines/ptq_int8.yaml``)."""
    import yaml
    spec = yaml.safe_load((ROOT / "amct_pipeline" / "pipelines" / "ptq_int8.yaml").read_text())
    passes = [p for p in spec["passes"] if p["pass"] not in ("lower", "export_amct")]
    for p in passes:
        if p["pass"] == "quantize_weights" and not bias_correction:
            p["options"] = {k: v for k, v in p["options"].items() if k not in ("bias_correction", "max_samples")}
    return passes


def _search_spec(analyze: str, max_evaluations: int, int4: bool) -> dict:
    """ptq_int8's passes (bias correction included: the search measures against the float model given
    as ``reference``), the analysis without output effects, and the search."""
    passes = _ptq_int8_passes(bias_correction=True)
    passes.append({"pass": analyze} if analyze == "given_analysis" else
                  {"pass": "analyze", "options": {"max_samples": 16, "output_effects": False}})
    passes.append({"pass": "mixed_precision", "options": {"max_samples": 16, "max_evaluations": max_evaluations,
                                                               "allow_int4": int4, "reference": str(MODEL)}})
    return {"schema_version": 1, "name": "mixed-search", "datasets": {"calib": {"reader": "npy"}}, "passes": passes}


def realize(work: Path, match_layers: dict, block_output_bits: int = 16) -> dict:
    """The chosen point built by the full ptq_int8 pipeline (bias correction included) with the point's
    match_layers options, lowered to every target (``qdq{mixed_block_output_bits}``); the fake-quant,
    QDQ and Ascend deploy models measured against the float model on the 150 images, the deploy model
    by the CPU reference of the Ascend operators (``ascend.reference``), and which layers
    onnxruntime runs in integers in the QDQ model."""
    from amct_pipeline.runtime.ort import make_session
    passes = _ptq_int8_passes(bias_correction=True)
    for p in passes:
        if p["pass"] == "match_layers":
            p["options"] = dict(match_layers)
    passes.append({"pass": "lower", "options": {"targets": ["fakequant", "qdq", "ascend"], "target_options": {
        "qdq": {"mixed_block_output_bits": block_output_bits}}}})
    spec = {"schema_version": 1, "name": "mixed-point", "datasets": {"calib": {"reader": "npy"}}, "passes": passes}
    calib, _ = imagenet(0, 100)
    result = _session().build(spec, datasets=["calib"]).run(str(MODEL), datasets={"calib": _batches(calib)},
                                                           output_dir=str(work / "point"))
    x, _ = imagenet(100, 250)
    ref_session = make_session(_float_model())
    refs = np.concatenate([ref_session.run(None, {"input": x[i:i + 25]})[0] for i in range(0, len(x), 25)])
    out = {}
    lowered = result.artifacts["lowered"]
    for target in ("fakequant", "qdq"):
        got_session = make_session(lowered[target], config={"session.disable_quant_qdq": "1"})
        got = np.concatenate([got_session.run(None, {"input": x[i:i + 25]})[0] for i in range(0, len(x), 25)])
        out[target] = _versus(got, refs)
    out["ascend"] = _deploy_figures(work / "point", x, refs)
    out["qdq_integer"] = integer_kernels(lowered["qdq"])
    return out


def _versus(got: np.ndarray, refs: np.ndarray) -> dict:
    error = float(np.sum((got - refs) ** 2, dtype=np.float64) / np.sum(refs ** 2, dtype=np.float64))
    return {"sqnr_db": round(-10 * np.log10(error), 3), "agreement": float(np.mean(got.argmax(1) == refs.argmax(1)))}


def _deploy_figures(folder: Path, x: np.ndarray, refs: np.ndarray) -> dict:
    """The Ascend deploy model run by the CPU reference of its operators (integer convs, AscendQuant /
    AscendDequant as specified; float ops in onnxruntime)."""
    from amct_pipeline.ascend.reference import DeployEvaluator
    path = next(folder.glob("*deploy_model.onnx"))
    evaluator = DeployEvaluator(str(path), float_ops="onnxruntime")
    name = evaluator.output_names[0]
    got = np.concatenate([evaluator.run({"input": x[i:i + 25]}, [name])[0] for i in range(0, len(x), 25)])
    return {"file": path.name, **_versus(got, refs)}


def integer_kernels(model) -> dict:
    """Operator counts of the QDQ model as onnxruntime optimizes it (QDQ fusion, extended level):
    QLinearConv / QGemm / QLinearAdd / QLinear* run in integers, Conv / FusedConv / Gemm in float."""
    import tempfile

    import onnxruntime as ort        # the optimized graph is only written by a session built here
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        import onnx
        ops = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    return {k: ops.count(k) for k in sorted(set(ops))}


def measure(result, configs: dict[str, dict]) -> dict[str, dict]:
    """Output SQNR and top-1 agreement of each configuration on the 150 held-out images (switch model)."""
    from amct_pipeline.algorithms.sensitivity import OutputMeter, SwitchModel, Variants, chosen_variants
    from amct_pipeline.ir.graph import Graph
    graph = Graph.from_proto(result.model)
    art = result.artifacts
    layers = [layer for layer in art["layer_map"].layers() if layer.name in art["act_quant"]]
    variants = chosen_variants(graph, layers, art["act_quant"], art["weight_quant"])
    extra = _extra_variants(graph, art, layers)
    for name, more in extra.items():
        variants[name] = Variants({**variants[name].act, **more.act}, {**variants[name].wts, **more.wts})
    model = SwitchModel(graph, layers, variants)
    session = model.session()
    x, _ = imagenet(100, 250)
    meter = OutputMeter(_float_model(), _batches(x, 25))
    return {label: meter.measure(session, model.feed(config)) for label, config in configs.items()}


def _extra_variants(graph, art, layers):
    """INT16 activations (min/max of the analysis) and INT4 weights (ARQ), as mixed_precision builds them."""
    from amct_pipeline.algorithms.sensitivity import INT16_ACT_TYPES, Variants
    from amct_pipeline.quant.math import arq, scale_offset_from_range
    from amct_pipeline.quant.weights import dequantize_weight, effective_weight
    rows = {r["name"]: r for r in art["sensitivity"]["layers"]}
    out = {}
    for layer in layers:
        act, wts = art["act_quant"][layer.name], art["weight_quant"].get(layer.name)
        v = Variants()
        if layer.op_type in INT16_ACT_TYPES:
            lo, hi = rows[layer.name]["input_range"]
            v.act[16] = scale_offset_from_range(lo, hi, 16, symmetric=act.offset == 0 and lo < 0)
        if layer.weight is not None and wts is not None and layer.op_type != "ConvTranspose":
            q = arq(effective_weight(graph, layer), layer.channel_axis if wts.scale.size > 1 else None, 4)
            v.wts[4] = dequantize_weight(q.quantized, q.scale, layer)
        out[layer.name] = v
    return out


def ranking_check(result, draws: int = 10) -> dict:
    from amct_pipeline.algorithms.sensitivity import Precision
    art = result.artifacts
    rows = art["sensitivity"]["layers"]
    full = {r["name"]: Precision(r["act_bits"], r["wts_bits"]) for r in rows}
    amct = list(art["sensitivity"]["ranking_information"])[:3]
    by_effect = [r["name"] for r in sorted(rows, key=lambda r: -(r.get("sqnr_all_but_db") or 0))][:3]
    rng = random.Random(0)
    randoms = [rng.sample(sorted(full), 3) for _ in range(draws)]
    configs = {"all INT8": full, "top-3 AMCT ranking float": _without(full, amct),
               "top-3 by output effect float": _without(full, by_effect)}
    configs.update({f"random {i}": _without(full, r) for i, r in enumerate(randoms)})
    measured = measure(result, configs)
    random_mean = float(np.mean([measured[f"random {i}"]["sqnr_db"] for i in range(draws)]))
    return {"layers_amct": amct, "layers_by_effect": by_effect, "random_draws": randoms,
            "sqnr_all_int8": measured["all INT8"]["sqnr_db"],
            "sqnr_top3_amct": measured["top-3 AMCT ranking float"]["sqnr_db"],
            "sqnr_top3_by_effect": measured["top-3 by output effect float"]["sqnr_db"],
            "sqnr_random3_mean": round(random_mean, 3),
            "sqnr_random3_each": [measured[f"random {i}"]["sqnr_db"] for i in range(draws)]}


def _without(config: dict, names) -> dict:
    return {k: v for k, v in config.items() if k not in set(names)}


def mixed_check(result, budget: float = 1.2) -> dict:
    from amct_pipeline.algorithms.sensitivity import Precision
    found = result.artifacts["mixed_precision"]
    rows = result.artifacts["sensitivity"]["layers"]
    full = {r["name"]: Precision(r["act_bits"], r["wts_bits"]) for r in rows}
    within = sorted((p for p in found["points"] if p["bitops"] <= budget * found["reference_bitops"]),
                    key=lambda p: -p["sqnr_db"])[:3]
    configs = {}
    for i, point in enumerate(within):
        config = dict(full)
        for name, text in point["precision"].items():
            config[name] = _parse(text)
            if config[name] is None:
                config.pop(name)
        configs[f"point {i}"] = config
    measured = measure(result, configs) if configs else {}
    out = []
    for i, point in enumerate(within):
        out.append({"label": point["label"], "bitops_ratio": round(point["bitops"] / found["reference_bitops"], 4),
                    "sqnr_db_search": point["sqnr_db"], "sqnr_db_heldout": measured[f"point {i}"]["sqnr_db"],
                    "agreement_heldout": measured[f"point {i}"]["agreement"], "precision": point["precision"]})
    return {"budget": budget, "evaluations": len(found["points"]), "front": len(found["front"]), "best": out}


def _parse(text: str):
    from amct_pipeline.algorithms.sensitivity import Precision
    if text == "float":
        return None
    act, _, wts = text[1:].partition("W")
    return Precision(None if act == "f" else int(act), None if wts in ("f", "None") else int(wts))


# -- auto calibration through the CLI --------------------------------------------------------------
def _autocal_command(out: Path, calib_file: Path) -> list[str]:
    return [sys.executable, "-m", "amct_pipeline", "run", "auto_calibrate_int8", "--model", str(MODEL),
            "--data", f"calib={calib_file}", "-o", str(out), "-q",
            "--set", "passes.auto_calibrate.options.evaluator=imagenet_evaluator:Top1Evaluator"]


def autocal_check(work: Path) -> dict:
    calib, _ = imagenet(0, 100)
    calib_file = work / "calib100.npy"
    np.save(calib_file, calib)
    env = dict(os.environ, PYTHONPATH=str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    done = subprocess.run(_autocal_command(work / "autocal_ref", calib_file), env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1:]}
    record = json.loads((work / "autocal_ref" / "accuracy_based_auto_calibration_record.json").read_text())
    # the same command, killed after its second evaluation, then run again
    out = work / "autocal_kill"
    killed = subprocess.Popen(_autocal_command(out, calib_file), env=dict(env, AMCT_BENCH_EVAL_SLEEP="2"))
    state = out / ".amct-autocal-mobilenetv2_fp32" / "state.json"
    while killed.poll() is None:
        try:
            if len(json.loads(state.read_text()).get("evaluations", {})) >= 1:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    killed_mid_way = killed.poll() is None
    if killed_mid_way:
        os.kill(killed.pid, signal.SIGKILL)          # our own child, by pid
    killed.wait()
    again = subprocess.run(_autocal_command(out, calib_file), env=env, capture_output=True, text=True)
    name = "accuracy_based_auto_calibration_final_config.json"
    same = again.returncode == 0 and (out / name).read_bytes() == (work / "autocal_ref" / name).read_bytes()
    resumed = json.loads((out / "accuracy_based_auto_calibration_record.json").read_text()) if not again.returncode else {}
    return {"seconds": round(seconds, 1), "original_top1": record["original_metric"],
            "all_int8_top1": record["global_metric"], "rolled_back": record["result"]["layers"],
            "final_top1": record["result"]["metric"], "trials": [(len(t["changed"]), t["metric"], t["satisfied"])
                                                                 for t in record["trials"]],
            "killed_mid_way": killed_mid_way, "same_final_config_after_restart": same,
            "resumed_evaluations": resumed.get("resumed_evaluations")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="sensitivity-bench", help="output folder")
    parser.add_argument("--analysis", help="reuse a <model>_sensitivity.json of the same calibration")
    parser.add_argument("--max-evaluations", type=int, default=40)
    parser.add_argument("--skip-autocal", action="store_true")
    parser.add_argument("--only-autocal", action="store_true")
    parser.add_argument("--only-analyze", action="store_true", help="time analyze against a float run, nothing else")
    parser.add_argument("--no-int4", action="store_true", help="mixed_precision{allow_int4=false} (with --ptq ptq_int8)")
    parser.add_argument("--only-mixed", action="store_true",
                        help="only the mixed-precision search, its best point re-measured and built through every target")
    parser.add_argument("--ptq", default=PTQ, help="passes before analyze (textual form; 'ptq_int8': the default "
                                                   "INT8 pipeline's passes, bias correction included, searched "
                                                   "against the float model); default AMCT's IFMR + ARQ")
    parser.add_argument("--point", help="with --only-mixed: build this best_match_layers JSON (a "
                                        "<model>_mixed_precision.json or its best_match_layers) instead of searching")
    parser.add_argument("--block-output-bits", type=int, choices=(8, 16), default=16,
                        help="qdq{mixed_block_output_bits} of the built point")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    if not MODEL.exists():
        print(f"skipping: missing {MODEL}", file=sys.stderr)
        return 0
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.only_mixed and args.point:
        given = json.loads(Path(args.point).read_text())
        given = given.get("best_match_layers", given)
        figures = {"mixed": {"built": realize(work, given, args.block_output_bits), "match_layers": given,
                             "load_average": [round(v, 2) for v in os.getloadavg()]}}
        print(json.dumps(figures["mixed"]["built"], indent=1))
        return _written(figures, args.json)
    if args.only_autocal:
        figures = {"autocal": autocal_check(work)}
        print(json.dumps(figures, indent=2))
        return _written(figures, args.json)
    result, timings = prepare(work, args.analysis, args.max_evaluations, args.ptq, mixed=not args.only_analyze,
                               int4=not args.no_int4)
    if args.only_analyze:
        figures = {"ptq": args.ptq, "timings": timings, **_float_runs(result, timings)}
        print(json.dumps(figures, indent=2))
        return _written(figures, args.json)
    if args.only_mixed:
        found = result.artifacts["mixed_precision"]
        figures = {"ptq": args.ptq, "timings": timings, "mixed": mixed_check(result),
                   "load_average": [round(v, 2) for v in os.getloadavg()]}
        if found.get("best_match_layers"):
            figures["mixed"]["built"] = realize(work, found["best_match_layers"], args.block_output_bits)
            figures["mixed"]["match_layers"] = found["best_match_layers"]
        print(json.dumps(figures["mixed"]["best"][:1] + [figures["mixed"].get("built")], indent=1))
        return _written(figures, args.json)
    layers = len(result.artifacts["sensitivity"]["layers"])
    figures = {"ptq": args.ptq, "timings": timings, "layers": layers, "ranking": ranking_check(result), "mixed": mixed_check(result)}
    if not args.skip_autocal:
        figures["autocal"] = autocal_check(work)
    print(report(figures))
    return _written(figures, args.json)


def _written(figures: dict, path: str | None) -> int:
    """``--json``: the figures also go to that file."""
    if path:
        Path(path).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


def _float_runs(result, timings: dict) -> dict:
    """analyze's time in float runs of the calibration data, against the bound L + 2."""
    layers = len(result.artifacts["sensitivity"]["layers"])
    runs = timings.get("analyze_s", 0) / max(timings["float_run_of_calibration_data_s"], 1e-9)
    return {"layers": layers, "analyze_float_runs": round(runs, 1), "bound_float_runs": layers + 2,
            "load_average": [round(v, 2) for v in os.getloadavg()]}


def _float_runs_text(f: dict) -> str:
    t = f["timings"]
    return f"{t.get('analyze_s', 0) / max(t['float_run_of_calibration_data_s'], 1e-9):.1f}"


def report(f: dict) -> str:
    r, m = f["ranking"], f["mixed"]
    lines = ["| MobileNetV2 (100 calibrate, 150 evaluate) | figure |", "|---|---|",
             f"| output SQNR, all INT8 (`{f['ptq']}`, fake-quant layout) | {r['sqnr_all_int8']:.2f} dB |",
             f"| 3 top-ranked (AMCT cosine) layers float | {r['sqnr_top3_amct']:.2f} dB |",
             f"| 3 top layers by output effect float | {r['sqnr_top3_by_effect']:.2f} dB |",
             f"| 3 random layers float, mean of 10 | {r['sqnr_random3_mean']:.2f} dB |"]
    for p in m["best"][:1]:
        lines.append(f"| best mixed point within {m['budget']}x INT8 bitops ({p['bitops_ratio']:.3f}x) | "
                     f"{p['sqnr_db_heldout']:.2f} dB, {100 * p['agreement_heldout']:.1f}% top-1 agreement |")
    t, runs = f["timings"], _float_runs_text(f)
    lines.append(f"| analyze time / float run of the calibration data | {t.get('analyze_s', 0)} s / "
                 f"{t['float_run_of_calibration_data_s']} s = {runs} float runs (bound: L + 2 = {f['layers'] + 2}) |")
    a = f.get("autocal")
    if a and "error" not in a:
        lines.append(f"| auto calibration (top-1 <= 0.5 below float {a['original_top1']:.2f}%) | all INT8 "
                     f"{a['all_int8_top1']:.2f}%, {len(a['rolled_back'])} rolled back, final {a['final_top1']:.2f}% |")
        lines.append(f"| SIGKILL mid-way + restart: same final config | {a['same_final_config_after_restart']} "
                     f"(killed mid-way: {a['killed_mid_way']}, {a['resumed_evaluations']} evaluations re-used) |")
    elif a:
        lines.append(f"| auto calibration | error: {a['error']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
