"""analyze, mixed_precision and the models behind them, checked against onnxruntime and numpy."""
from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from amct_pipeline.algorithms.sensitivity import Precision, SwitchModel, Variants, chosen_variants
from amct_pipeline.demo import build_demo_data, build_demo_model
from amct_pipeline.errors import ConfigError, PassError
from amct_pipeline.pipeline.spec import DatasetSpec
from amct_pipeline.quant.cost import bitops, layer_flops
from amct_pipeline.quant.layers import QuantLayer
from amct_pipeline.quant.math import fake_quant
from amct_pipeline.runtime.data import ArraySource
from amct_pipeline.runtime.ort import run_model
from amct_pipeline.testing.models import quant_layers_model

PTQ = "fuse_bn,match_layers,calibrate,quantize_weights"


def _source(count: int = 48, batch_size: int = 16, seed: int = 1) -> ArraySource:
    return ArraySource("calib", {"x": build_demo_data(count, seed=seed)}, DatasetSpec(batch_size=batch_size), "test")


def _run(session, text: str, output_dir=None, model=None):
    return session.build(text, datasets=["calib"]).run(model or build_demo_model(), datasets={"calib": _source()},
                                                       output_dir=output_dir)


def _sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    return -10 * math.log10(float(np.sum((got - ref) ** 2)) / float(np.sum(ref ** 2)))


def test_flops_follow_amct_formulas():
    conv = QuantLayer("c", "Conv", "x", "y", weight="w", bias="b", channel_axis=0, out_channels=8)
    # (2 * Cin/g * kh * kw - 1 + bias) * Hout * Wout * Cout
    assert layer_flops(conv, (1, 4, 10, 10), (1, 8, 5, 5), (8, 4, 3, 3)) == (2 * 4 * 9 - 1 + 1) * 25 * 8
    deconv = QuantLayer("d", "ConvTranspose", "x", "y", weight="w", channel_axis=1, out_channels=6, group=2)
    # per output value Cin/g products; Hin * Win positions
    assert layer_flops(deconv, (1, 4, 3, 3), (1, 6, 6, 6), (4, 3, 2, 2)) == (2 * 2 * 4 - 1) * 9 * 6
    fc = QuantLayer("f", "Gemm", "x", "y", weight="w", bias="b")
    assert layer_flops(fc, (7, 64), (7, 10), (64, 10)) == (2 * 64 - 1 + 1) * 10
    assert bitops(100, 8, 8) == 6400 and bitops(100, 16, 4) == 6400 and bitops(100, None, None) == 102400


def test_analyze_sensitivity_matches_numpy_and_onnxruntime(session, tmp_path):
    result = _run(session, PTQ + ",analyze{max_samples=16 plot=sens.png}", tmp_path)
    report = result.artifacts["sensitivity"]
    act, wts, layer_map = (result.artifacts[k] for k in ("act_quant", "weight_quant", "layer_map"))
    written = json.loads((tmp_path / "model_sensitivity.json").read_text())
    assert written["ranking_information"] == report["ranking_information"]
    assert (tmp_path / "sens.png").stat().st_size > 1000
    rows = {r["name"]: r for r in report["layers"]}
    assert list(report["ranking_information"]) == sorted(rows, key=lambda n: rows[n]["cosine_similarity"])
    model = result.model
    # the first layer, recomputed by hand: its fake-quant twin on the float input, per batch cos
    layer = layer_map.layers()[0]
    x = build_demo_data(48, seed=1)
    w = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == layer.weight))
    b = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == layer.bias))
    node = next(n for n in model.graph.node if n.name == layer.name)
    wq = wts[layer.name].quantized.astype(np.float32) * wts[layer.name].scale.reshape(-1, 1, 1, 1)
    cos, sse, count = [], 0.0, 0
    for start in range(0, 48, 16):
        batch = x[start:start + 16]
        ref = _conv(node, batch, w, b)
        got = _conv(node, fake_quant(batch, act[layer.name]), wq, b)
        cos.append(0.5 + 0.5 * float(np.sum(ref * got) / np.sqrt(np.sum(ref ** 2) * np.sum(got ** 2))))
        sse, count = sse + float(np.sum((ref - got) ** 2)), count + ref.size
    assert rows[layer.name]["cosine_similarity"] == pytest.approx(np.mean(cos), abs=1e-6)
    assert rows[layer.name]["mse"] == pytest.approx(sse / count, rel=1e-3)
    # FLOPs per sample from the runtime shapes; bitops at A8W8
    assert rows[layer.name]["bitops"] == rows[layer.name]["flops"] * 64
    assert report["total"]["bitops"] == sum(r["bitops"] for r in rows.values())
    # output effects equal the fake-quant model lowered with only that layer (or all but it) quantized
    # (within 0.3 dB: the lowered model rounds the bias to INT32, the measuring model keeps it float)
    names = list(rows)
    flt = run_model(model, {"input": x[:16]})[0]
    for keep, key in (([names[1]], "sqnr_only_db"), ([n for n in names if n != names[1]], "sqnr_all_but_db")):
        skip = ",".join(n for n in names if n not in keep)
        lowered = _run(session, f"fuse_bn,match_layers{{skip_layers=[{skip}]}},calibrate,quantize_weights,"
                                "lower{targets=[fakequant]}").artifacts["lowered"]["fakequant"]
        assert rows[names[1]][key] == pytest.approx(_sqnr(flt, run_model(lowered, {"input": x[:16]})[0]), abs=0.3)
    assert report["all_quantized"]["sqnr_db"] < min(r["sqnr_only_db"] for r in rows.values())
    assert "| rank | layer |" in dict(result.reports)["analyze"]


def _conv(node, x, w, b):
    one = helper.make_graph([helper.make_node("Conv", ["x", "w", "b"], ["y"], **{
        a.name: helper.get_attribute_value(a) for a in node.attribute})], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(b, "b")])
    return run_model(helper.make_model(one, opset_imports=[helper.make_opsetid("", 13)]), {"x": x})[0]


def test_switch_model_equals_the_fakequant_model_and_the_float_model(session):
    result = _run(session, PTQ + ",lower{targets=[fakequant]}")
    graph_model = session.build("fuse_bn").run(build_demo_model()).model
    from amct_pipeline.ir.graph import Graph
    graph = Graph.from_proto(graph_model)
    layer_map, act, wts = (result.artifacts[k] for k in ("layer_map", "act_quant", "weight_quant"))
    layers = layer_map.layers()
    switch = SwitchModel(graph, layers, chosen_variants(graph, layers, act, wts))
    x = build_demo_data(8, seed=3)
    name = graph_model.graph.input[0].name
    full = {layer.name: Precision(8, 8) for layer in layers}
    got = switch.session().run(None, {name: x, **switch.feed(full)})[0]
    fq = run_model(result.artifacts["lowered"]["fakequant"], {name: x})[0]
    np.testing.assert_allclose(got, fq, rtol=1e-4, atol=1e-4 * float(np.abs(fq).max()))
    flt = switch.session().run(None, {name: x, **switch.feed({})})[0]
    np.testing.assert_allclose(flt, run_model(graph_model, {name: x})[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception, match="16-bit"):
        switch.check({layers[0].name: Precision(16, 8)})


def test_analyze_covers_every_layer_type(session):
    model = quant_layers_model()
    x = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)
    source = ArraySource("calib", {"x": np.concatenate([x, x * 0.5])}, DatasetSpec(batch_size=2), "test")
    result = session.build(PTQ + ",analyze{max_samples=2}", datasets=["calib"]).run(model, datasets={"calib": source})
    rows = {r["name"]: r for r in result.artifacts["sensitivity"]["layers"]}
    assert {"conv", "deconv", "pool", "fc", "mm", "conv3d"} <= set(rows)
    assert all(0.0 <= r["cosine_similarity"] <= 1.0 and r["flops"] > 0 for r in rows.values())
    assert rows["fc"]["flops"] == (2 * 64 - 1 + 1) * 6


def test_mixed_precision_front_is_pareto_and_exact(session, tmp_path):
    result = _run(session, PTQ + ",analyze{max_samples=16},mixed_precision{max_samples=16 max_evaluations=12}", tmp_path)
    found = result.artifacts["mixed_precision"]
    points, front = found["points"], found["front"]
    assert len(points) <= 12 and front
    assert (tmp_path / "model_mixed_precision.png").stat().st_size > 1000
    assert json.loads((tmp_path / "model_mixed_precision.json").read_text())["front"] == json.loads(
        json.dumps(front))
    for p in points:    # nothing on the front is beaten on both axes
        assert not any(q["bitops"] <= p["bitops"] and q["sqnr_db"] > p["sqnr_db"] for q in points) or p not in front
    base = next(p for p in points if p["raised"] == 0 and p["lowered"] == 0)
    assert base["bitops"] == found["reference_bitops"]
    assert base["sqnr_db"] == pytest.approx(result.artifacts["sensitivity"]["all_quantized"]["sqnr_db"], abs=1e-3)
    raised = [p for p in points if p["lowered"] == 0 and p["raised"] > 0]
    assert raised and all(p["bitops"] > base["bitops"] for p in raised)
    lowered = [p for p in points if p["raised"] == 0 and p["lowered"] > 0]
    assert lowered and all(p["bitops"] < base["bitops"] for p in lowered)


def test_analyze_options_are_bounded(session):
    with pytest.raises(ConfigError, match="max_samples"):
        session.build(PTQ + ",analyze{max_samples=100000}", datasets=["calib"])
    with pytest.raises(ConfigError, match="max_evaluations"):
        session.build(PTQ + ",mixed_precision{max_evaluations=5000}", datasets=["calib"])


def test_variants_unused_layers_stay_float(session):
    result = _run(session, PTQ)
    from amct_pipeline.ir.graph import Graph
    graph = Graph.from_proto(session.build("fuse_bn").run(build_demo_model()).model)
    layers = result.artifacts["layer_map"].layers()
    switch = SwitchModel(graph, layers, {layers[0].name: Variants({8: result.artifacts["act_quant"][layers[0].name]})})
    assert len(switch.inputs) == 1


def test_analyze_command_writes_json_png_and_prints_the_table(tmp_path):
    import subprocess
    import sys
    model, data = tmp_path / "demo.onnx", tmp_path / "calib.npy"
    onnx.save(build_demo_model(), model)
    np.save(data, build_demo_data(32, seed=1))
    done = subprocess.run([sys.executable, "-m", "amct_pipeline", "--no-plugins", "analyze", "--model", str(model),
                           "--data", f"calib={data}", "-o", str(tmp_path / "out"), "--plot", "--max-samples", "8"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    written = json.loads((tmp_path / "out" / "demo_sensitivity.json").read_text())
    assert len(written["layers"]) == 3 and written["output_samples"] == 8
    assert (tmp_path / "out" / "demo_sensitivity.png").is_file()
    assert "| rank | layer |" in done.stderr and "total:" in done.stderr
    bad = subprocess.run([sys.executable, "-m", "amct_pipeline", "--no-plugins", "analyze", "--model", str(model),
                          "--data", f"calib={tmp_path / 'missing.npy'}", "-o", str(tmp_path / "o2")],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1 and "missing.npy" in bad.stderr


def test_output_effects_measure_against_the_float_model_after_bias_correction(session):
    """Bias correction writes shifted biases into the graph (for the quantized model): the output effects
    are still measured against the input model, so the all-quantized figure is the fake-quant model's
    SQNR against it, and a layer left float keeps its float bias."""
    x = build_demo_data(48, seed=1)
    text = ("fuse_bn,match_layers,calibrate,quantize_weights{bias_correction=true},analyze{max_samples=16},"
            "lower{targets=[fakequant]}")
    result = _run(session, text)
    assert result.artifacts["float_values"]          # bias correction moved biases
    report = result.artifacts["sensitivity"]
    flt = run_model(build_demo_model(), {"input": x[:16]})[0]
    fake = run_model(result.artifacts["lowered"]["fakequant"], {"input": x[:16]})[0]
    assert report["all_quantized"]["sqnr_db"] == pytest.approx(_sqnr(flt, fake), abs=0.3)
    names = [r["name"] for r in report["layers"]]
    rest = ",".join(names[1:])
    one = _run(session, f"fuse_bn,match_layers{{skip_layers=[{rest}]}},calibrate,quantize_weights{{bias_correction=true}},"
                        "lower{targets=[fakequant]}").artifacts["lowered"]["fakequant"]
    row = report["layers"][0]
    assert row["sqnr_only_db"] == pytest.approx(_sqnr(flt, run_model(one, {"input": x[:16]})[0]), abs=0.3)


def _residual_two_output_model() -> onnx.ModelProto:
    """x -> c0 -> "side" (an output the later layers never reach); x -> c1 -> relu -> c2 -> relu, added
    to the relu of c1 (a residual branch the suffixes read from the cache) -> c3 -> "feat", and -> pool
    -> Reshape (shape from a Constant node) -> Gemm (alpha 0.5, transB) -> "logits"."""
    from amct_pipeline.testing.models import make_model
    rng = np.random.default_rng(4)

    def init(name, *shape):
        return onnx.numpy_helper.from_array(rng.normal(0, 0.4, shape).astype(np.float32), name)
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["side"], name="c0", kernel_shape=[1, 1]),
             helper.make_node("Conv", ["x", "w1", "b1"], ["y1"], name="c1", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["y1"], ["r1"], name="r1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["y2"], name="c2", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["y2"], ["r2"], name="r2"),
             helper.make_node("Add", ["r1", "r2"], ["res"], name="add"),
             helper.make_node("Conv", ["res", "w3", "b3"], ["feat"], name="c3", kernel_shape=[1, 1]),
             helper.make_node("GlobalAveragePool", ["res"], ["pool"], name="gap"),
             helper.make_node("Constant", [], ["shape"], name="shape",
                              value=onnx.numpy_helper.from_array(np.array([-1, 8], np.int64))),
             helper.make_node("Reshape", ["pool", "shape"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], name="fc", alpha=0.5, transB=1)]
    inits = [init("w0", 2, 3, 1, 1), init("b0", 2), init("w1", 8, 3, 3, 3), init("b1", 8), init("w2", 8, 8, 3, 3),
             init("b2", 8), init("w3", 4, 8, 1, 1), init("b3", 4), init("wf", 10, 8), init("bf", 10)]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 8, 8])],
                      [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("logits", "feat", "side")],
                      inits)


@pytest.mark.parametrize("budget", [None, 1])
def test_output_effects_by_suffix_equal_the_switch_model(session, monkeypatch, budget):
    """The suffix execution gives the figures the switch model gives (one run per configuration on
    the same samples), across batches (8, 8 and a cut 4), residual branches, several outputs and
    (budget 1) one group of suffix sessions per layer, every weight shared by reference."""
    from amct_pipeline.algorithms import sensitivity
    from amct_pipeline.algorithms.sensitivity import OutputMeter, quantized_config, subset_feeds
    from amct_pipeline.ir.graph import Graph
    if budget is not None:
        monkeypatch.setattr(sensitivity, "SUFFIX_WEIGHT_BUDGET", budget)
        monkeypatch.setattr(sensitivity.SharedWeights, "MIN_SIZE", 1)
    x = np.random.default_rng(5).normal(size=(24, 3, 8, 8)).astype(np.float32)
    source = ArraySource("calib", {"x": x}, DatasetSpec(batch_size=8), "test")
    result = session.build("match_layers,calibrate,quantize_weights,analyze{max_samples=20}",
                           datasets=["calib"]).run(_residual_two_output_model(), datasets={"calib": source})
    report, art = result.artifacts["sensitivity"], result.artifacts
    graph = Graph.from_proto(result.model)
    layers = [layer for layer in art["layer_map"].layers() if layer.name in art["act_quant"]]
    assert {layer.name for layer in layers} == {"c0", "c1", "c2", "c3", "fc"} and report["output_samples"] == 20
    switch = SwitchModel(graph, layers, chosen_variants(graph, layers, art["act_quant"], art["weight_quant"]))
    meter = OutputMeter(result.model, subset_feeds(graph, source, 20))
    full = quantized_config(layers, art["act_quant"], art["weight_quant"])
    whole = meter.measure(switch.session(), switch.feed(full))
    assert report["all_quantized"]["sqnr_db"] == pytest.approx(whole["sqnr_db"], abs=1e-3)
    assert report["all_quantized"]["agreement"] == whole["agreement"]
    for row in report["layers"]:
        name = row["name"]
        only = meter.measure(switch.session(), switch.feed({name: full[name]}))
        rest = meter.measure(switch.session(), switch.feed({k: v for k, v in full.items() if k != name}))
        assert row["sqnr_only_db"] == pytest.approx(only["sqnr_db"], abs=1e-3), name
        assert row["sqnr_all_but_db"] == pytest.approx(rest["sqnr_db"], abs=1e-3), name
        assert row["agreement_all_but"] == rest["agreement"], name
    # independently: quantizing only c0 changes only "side", so its figure is a third of that output's
    # relative error (c0 by hand: fake-quant input, fake-quant weight, through onnxruntime)
    node = next(n for n in result.model.graph.node if n.name == "c0")
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}
    wq = art["weight_quant"]["c0"].quantized.astype(np.float32) * art["weight_quant"]["c0"].scale.reshape(-1, 1, 1, 1)
    ref = _conv(node, x[:20], weights["w0"], weights["b0"])
    got = _conv(node, fake_quant(x[:20], art["act_quant"]["c0"]), wq, weights["b0"])
    expected = -10 * math.log10(float(np.sum((got - ref) ** 2)) / float(np.sum(ref ** 2)) / 3)
    assert next(r for r in report["layers"] if r["name"] == "c0")["sqnr_only_db"] == pytest.approx(expected, abs=0.01)


def test_mixed_precision_point_within_budget_builds_through_every_target(session, tmp_path):
    """The knapsack's best point within the budget beats the point as asked, and its match_layers options
    rebuild it exactly: the fake-quant model of the rebuilt pipeline gives the SQNR the search measured."""
    text = PTQ + ",analyze{max_samples=16 output_effects=false},mixed_precision{max_samples=16 budget=1.5 refine=4}"
    result = _run(session, text, tmp_path)
    found = result.artifacts["mixed_precision"]
    best, base = found["best_within_budget"], found["points"][0]
    assert base["precision"] == {} and best["bitops"] <= 1.5 * found["reference_bitops"]
    assert best["sqnr_db"] > base["sqnr_db"] and best["precision"]
    assert {m["layer"] for m in found["moves"]} == {r["name"] for r in result.artifacts["sensitivity"]["layers"]}
    options = found["best_match_layers"]
    assert set(options["precision"]) == set(best["precision"])
    spec = {"schema_version": 1, "name": "point", "datasets": {"calib": {"reader": "npy"}},
            "passes": [{"pass": "fuse_bn"}, {"pass": "match_layers", "options": options}, {"pass": "calibrate"},
                       {"pass": "quantize_weights"},
                       {"pass": "lower", "options": {"targets": ["fakequant", "qdq", "ascend"]}}]}
    built = session.build(spec, datasets=["calib"]).run(build_demo_model(), datasets={"calib": _source()},
                                                        output_dir=tmp_path / "point")
    x = build_demo_data(48, seed=1)[:16]
    name = build_demo_model().graph.input[0].name
    ref = run_model(build_demo_model(), {name: x})
    got = run_model(built.artifacts["lowered"]["fakequant"], {name: x})
    error = np.mean([np.sum((g - r) ** 2) / np.sum(r ** 2) for g, r in zip(got, ref)])
    assert -10 * math.log10(error) == pytest.approx(best["sqnr_db"], abs=0.05)
    assert list((tmp_path / "point").glob("*deploy*.onnx")) and built.artifacts["lowered"]["qdq"] is not None


def test_mixed_precision_reference_model(session, tmp_path):
    """``reference`` names the float model the points are measured against: the model itself gives the
    same points as the graph; a model with other inputs / outputs is a one-line error naming the option."""
    onnx.save(build_demo_model(), str(tmp_path / "float.onnx"))
    text = PTQ + ",analyze{max_samples=16 output_effects=false},mixed_precision{max_samples=8 max_evaluations=6 %s}"
    plain = _run(session, text % "").artifacts["mixed_precision"]["points"]
    given = _run(session, text % f"reference={tmp_path / 'float.onnx'}").artifacts["mixed_precision"]["points"]
    assert [p["sqnr_db"] for p in given] == [p["sqnr_db"] for p in plain]
    onnx.save(quant_layers_model(), str(tmp_path / "other.onnx"))
    with pytest.raises(PassError, match="mixed_precision.reference .*other.onnx"):
        _run(session, text % f"reference={tmp_path / 'other.onnx'}")
    with pytest.raises(ConfigError, match=r"options.reference: .* is a directory, not a regular file"):
        _run(session, text % f"reference={tmp_path}", output_dir=tmp_path / "out")    # checked before any pass


def _residual_block_model() -> onnx.ModelProto:
    """x -> c0 -> Clip(0, 6) -> r0; r0 -> c1 -> Relu -> c2 (no activation: a projection) -> Add(r0, .) ->
    c3 -> Relu -> pool -> Reshape -> Gemm "logits": a residual block whose residual tensor r0 is read by
    a layer (c1) and by the Add, its projection output only by the Add; c3's output a block output too.
    The 16-bit range of r0 is wider than the Clip: the Clip stays a float op (no uint16 Clip in ORT)."""
    from amct_pipeline.testing.models import make_model
    rng = np.random.default_rng(7)

    def init(name, *shape, std=0.4):
        return onnx.numpy_helper.from_array(rng.normal(0, std, shape).astype(np.float32), name)
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["y0"], name="c0", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("Clip", ["y0", "lo", "hi"], ["r0"], name="relu6"),
             helper.make_node("Conv", ["r0", "w1", "b1"], ["y1"], name="c1", kernel_shape=[1, 1]),
             helper.make_node("Relu", ["y1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["y2"], name="c2", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("Add", ["r0", "y2"], ["res"], name="add"),
             helper.make_node("Conv", ["res", "w3", "b3"], ["y3"], name="c3", kernel_shape=[1, 1]),
             helper.make_node("Relu", ["y3"], ["r3"], name="relu3"),
             helper.make_node("GlobalAveragePool", ["r3"], ["pool"], name="gap"),
             helper.make_node("Constant", [], ["shape"], name="shape",
                              value=onnx.numpy_helper.from_array(np.array([-1, 16], np.int64))),
             helper.make_node("Reshape", ["pool", "shape"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], name="fc", transB=1)]
    inits = [onnx.numpy_helper.from_array(np.array(0, np.float32), "lo"),
             onnx.numpy_helper.from_array(np.array(6, np.float32), "hi"),
             init("w0", 16, 3, 3, 3), init("b0", 16), init("w1", 16, 16, 1, 1, std=0.25), init("b1", 16),
             init("w2", 16, 16, 3, 3, std=0.1), init("b2", 16), init("w3", 16, 16, 1, 1, std=0.25), init("b3", 16),
             init("wf", 10, 16), init("bf", 10)]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 8, 8])],
                      [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], inits)


def _qdq_bits(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Tensor -> bits of the QuantizeLinear pairs reading it (activations only)."""
    inits = {t.name: t for t in model.graph.initializer}
    found: dict[str, list[int]] = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in inits:
            dtype = inits[node.input[2]].data_type
            found.setdefault(node.input[0], []).append(16 if dtype == TensorProto.UINT16 else 8)
    return {k: sorted(v) for k, v in found.items()}


def test_mixed_point_qdq_model_computes_what_its_fakequant_model_does(session, tmp_path):
    """A mixed point (c3, which reads the residual Add, at A16; the rest A8) lowered with the QDQ
    layout's block outputs (calibrate{block_outputs}): they get 16 bits (the Add's output c3 reads, the
    projection output, the residual read of r0, c3's output), c1 keeps its 8-bit input through a pair
    of its own, the QDQ model gives the fake-quant model's SQNR through onnxruntime (the 8-bit block
    outputs of mixed_block_output_bits=8 do not) and c1 still runs as an integer QLinearConv."""
    model = _residual_block_model()
    x = np.random.default_rng(8).normal(size=(48, 3, 8, 8)).astype(np.float32)
    source = ArraySource("calib", {"x": x}, DatasetSpec(batch_size=16), "test")

    def build(bits: int):
        spec = {"schema_version": 1, "name": "point", "datasets": {"calib": {"reader": "npy"}},
                "passes": [{"pass": "match_layers", "options": {"precision": {"c3": {"act": 16}}}},
                           {"pass": "calibrate", "options": {"block_outputs": True}}, {"pass": "quantize_weights"},
                           {"pass": "lower", "options": {"targets": ["fakequant", "qdq"], "target_options": {
                               "qdq": {"mixed_block_output_bits": bits}}}}]}
        return session.build(spec, datasets=["calib"]).run(model, datasets={"calib": source})

    wide, narrow = build(16), build(8)
    assert wide.artifacts["tensor_quant"]            # the block outputs were calibrated
    qdq = wide.artifacts["lowered"]["qdq"]
    bits = _qdq_bits(qdq)
    assert bits["res"] == [16]                       # read by the A16 layer c3
    assert bits["y2"] == [16]                        # the projection output
    assert bits["r0"] == [8, 16]                     # c1's own pair, the Add's
    assert bits["y3"] == [16] and bits["flat"] == [8]    # c3's output (before its Relu); fc's own 8-bit input
    assert _qdq_bits(narrow.artifacts["lowered"]["qdq"])["y2"] == [8]
    ref = run_model(model, {"x": x})[0]
    fake = run_model(wide.artifacts["lowered"]["fakequant"], {"x": x})[0]
    got = {bits: run_model(r.artifacts["lowered"]["qdq"], {"x": x})[0] for bits, r in ((16, wide), (8, narrow))}
    assert abs(_sqnr(ref, got[16]) - _sqnr(ref, fake)) <= 0.1
    assert _sqnr(fake, got[16]) > _sqnr(fake, got[8]) + 3           # 8-bit block outputs: their own noise
    from amct_pipeline.runtime.ort import make_session
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(qdq.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops.count("QLinearConv") == 1 and "Conv" in ops, ops     # c1 integer; c0, c2, c3 float
    assert np.allclose(make_session(qdq).run(None, {"x": x})[0], got[16], atol=1e-3 * np.abs(got[16]).max())
