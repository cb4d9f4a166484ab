"""The decompose pass on small models: numerics through onnxruntime, eligibility, targets, errors, files."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from amct_pipeline.errors import ConfigError, PassError
from amct_pipeline.testing.numerics import max_rel_diff, run_model
from decomp_helpers import conv_chain, conv_flops, feeds, sqnr, structure

# stride 2 with asymmetric pads, auto_pad SAME_UPPER without bias, Cout < Cin (AMCT's FC mode)
LAYERS = [{"cout": 12, "k": 3, "stride": 2, "pads": [0, 0, 1, 1]},
          {"cout": 16, "k": 5, "auto_pad": "SAME_UPPER", "bias": False},
          {"cout": 6, "k": 3}]
FULL_RANKS = {"spatial_svd": {"conv0": 24, "conv1": 60, "conv2": 18},
              "tucker2": {"conv0": [8, 12], "conv1": [12, 16], "conv2": [16, 6]}}


def _run(session, model, *, data=None, output_dir=None, **options):
    pipeline = session.pipeline([session.make_pass("decompose", **options)])
    return pipeline.run(model, datasets={"calib": data} if data is not None else None, output_dir=output_dir)


@pytest.mark.parametrize("method", list(FULL_RANKS))
def test_full_rank_children_compute_the_same_outputs(session, method):
    model = conv_chain(LAYERS)
    result = _run(session, model, method=method, rules="basic", ranks=FULL_RANKS[method])
    convs = [n for n in result.model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 3 * (2 if method == "spatial_svd" else 3)
    assert [o.name for o in result.model.graph.output] == ["y"]
    feed = feeds(model)[0]
    assert max_rel_diff(run_model(model, feed)[0], run_model(result.model, feed)[0]) < 1e-4
    # bias only on the last child of each layer; children named <layer>.<i>
    assert [len(n.input) for n in convs if n.name.startswith("conv0.")][-1] == 3
    assert all(len(n.input) == 2 for n in convs if n.name.startswith("conv1."))
    assert result.artifacts["decomposition"].changes["conv2"][0] == "conv2.0"


def test_cp_structure_and_numerics(session):
    rng = np.random.default_rng(2)
    factors = [rng.normal(size=(n, 4)) for n in (10, 8, 3, 3)]
    weight = np.einsum("ar,br,cr,dr->abcd", *factors) / 6
    model = conv_chain([{"cout": 10, "k": 3, "weight": weight, "stride": 2}])
    result = _run(session, model, method="cp", ranks={"conv0": 4})
    convs = [n for n in result.model.graph.node if n.op_type == "Conv"]
    groups = [next((a.i for a in n.attribute if a.name == "group"), 1) for n in convs]
    assert groups == [1, 4, 4, 1]
    feed = feeds(model)[0]
    assert max_rel_diff(run_model(model, feed)[0], run_model(result.model, feed)[0]) < 1e-3


def test_every_layer_left_alone_has_a_reason(session):
    model = conv_chain([{"cout": 8, "k": 3, "group": 2}, {"cout": 8, "k": 3, "dilation": 2, "pads": [2] * 4},
                        {"cout": 8, "k": 1}, {"cout": 8, "k": [3, 5]}, {"cout": 8, "k": 3}])
    stats = _run(session, model, target=0.5).stats_for("decompose")
    assert stats["decomposed"] == 1 and list(stats["ranks"]) == ["conv4"]
    reasons = stats["skipped"]
    assert "group=2" in reasons["conv0"] and "dilation" in reasons["conv1"]
    assert "too small" in reasons["conv2"] and "not square" in reasons["conv3"]
    amct = _run(session, model, method="spatial_svd").stats_for("decompose")   # AMCT rules by default
    assert "AMCT rule" in amct["skipped"]["conv4"] and amct["decomposed"] == 0


@pytest.mark.parametrize("metric", ["flops", "params"])
def test_target_is_met_across_layers(session, metric):
    model = conv_chain([{"cout": 16, "k": 3}, {"cout": 24, "k": 3, "stride": 2}, {"cout": 16, "k": 5}], cin=12)
    result = _run(session, model, method="tucker2", target=0.3, target_metric=metric, ranks={"conv0": [6, 8]})
    report = result.artifacts["decomposition"].report
    assert len(report.layers) >= 2 and report.layers[0].rank == (6, 8)
    key = "flops" if metric == "flops" else "params"
    # the target bounds every layer considered: one the allocation keeps whole counts in full
    whole = sum(_cost(model, name, key) for name in ("conv1", "conv2") if name in result.stats_for("decompose")["skipped"])
    before, after = report.total(f"{key}_before") + whole, report.total(f"{key}_after") + whole
    assert 0.2 * before <= after <= 0.3 * before        # met, and the slack is spent
    if metric == "flops":   # the pass's counts agree with shape inference on the written model
        assert sum(conv_flops(result.model).values()) == after
        assert sum(conv_flops(model).values()) == before


def _cost(model, name: str, key: str) -> int:
    """A conv's SPEC 8.2 FLOPs or parameter count (weight and bias of conv_chain's naming)."""
    if key == "flops":
        return conv_flops(model)[name]
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.name.startswith(f"{name}."))


def test_data_aware_beats_data_free_on_held_out_data(session):
    model = conv_chain([{"cout": 24, "k": 3}, {"cout": 24, "k": 3}, {"cout": 8, "k": 3}], cin=8, hw=16, batch=None)
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(8, 8)) * np.logspace(0, -3, 8)         # strongly correlated input channels

    def make(n: int) -> list[dict[str, np.ndarray]]:
        return [{"x": np.einsum("ij,njhw->nihw", mix, rng.normal(size=(4, 8, 16, 16))).astype(np.float32)}
                for _ in range(n)]

    calib, held_out = make(3), make(2)
    ref = [run_model(model, f)[0] for f in held_out]
    figures = {}
    for aware in (False, True):
        result = _run(session, model, data=calib, method="tucker2", target=0.5, dataset="calib", data_aware=aware)
        figures[aware] = sqnr(ref, [run_model(result.model, f)[0] for f in held_out])
        report = result.artifacts["decomposition"].report
        assert report.output_sqnr_db is not None and report.samples == 12
        if aware:   # the refit of each last child helps, most where earlier layers already drifted
            gains = [layer.response_sqnr_db - layer.response_sqnr_before_refit_db for layer in report.layers]
            assert min(gains) >= 0 and max(gains[1:]) > 0.5, gains
    assert figures[True] > figures[False] + 4, figures


def test_bad_input_is_a_clear_error_and_writes_nothing(session, tmp_path):
    model = conv_chain([{"cout": 8, "k": 3, "group": 2}, {"cout": 8, "k": 3}])
    out = tmp_path / "out"
    cases = {"group=2": dict(include=["conv0"]),
             "larger than layer 'conv1' allows": dict(ranks={"conv1": 25}),
             "did you mean 'conv1'": dict(exclude=["conv_1"]),
             "is a Identity, not a Conv": dict(include=["out"])}
    for message, options in cases.items():
        with pytest.raises(PassError, match=message):
            _run(session, model, output_dir=out, **options)
        assert not out.exists() or not any(out.iterdir())
    for target in (0, 1.5, -0.2):
        with pytest.raises(ConfigError, match=r"target must be in \(0, 1\]"):
            session.make_pass("decompose", target=target)
    with pytest.raises(ConfigError, match="data_aware needs a calibration dataset"):
        session.make_pass("decompose", data_aware=True)
    with pytest.raises(ConfigError, match="unknown decomposition method 'tuker2'.*did you mean 'tucker2'"):
        session.build({"passes": [{"pass": "decompose", "options": {"method": "tuker2"}}]})


def test_decompose_after_match_layers_is_refused(session):
    with pytest.raises(PassError, match="put decompose before match_layers"):
        session.build("match_layers,decompose").run(conv_chain([{"cout": 8, "k": 3}]))


def test_info_file_and_reapplied_structure(session, tmp_path):
    model = conv_chain(LAYERS)
    src = tmp_path / "chain.onnx"
    onnx.save(model, str(src))
    result = session.build({"passes": [{"pass": "decompose", "options": {"method": "spatial_svd", "rules": "basic",
                                                                          "ranks": {"conv0": 2, "conv2": 2}}},
                                       {"pass": "save", "options": {"filename": "{model}_dec.onnx"}}]}
                           ).run(str(src), output_dir=tmp_path / "out")
    assert sorted(p.name for p in result.files) == ["chain_dec.onnx", "chain_decompose_info.json"]
    info = json.loads((tmp_path / "out" / "chain_decompose_info.json").read_text())
    entry = info["conv0"]
    assert list(entry)[:3] == ["ori_layer_info", "mode", "decom_nodes"] and entry["mode"] == "SCFK"
    assert entry["ori_layer_info"] == {"name": "conv0", "in_channels": 8, "out_channels": 12, "kernel_size": [3, 3],
                                       "stride": [2, 2], "dilation": [1, 1], "groups": 1, "padding": [0, 0, 1, 1],
                                       "bias": True}
    assert list(entry["decom_nodes"]) == ["first", "last"] and info["conv2"]["mode"] == "FCFK"
    decomposed = onnx.load(str(tmp_path / "out" / "chain_dec.onnx"))
    again = session.build({"passes": [{"pass": "apply_decomposition", "options": {
        "info_file": str(tmp_path / "out" / "chain_decompose_info.json")}}]}).run(str(src))
    assert structure(again.model) == structure(decomposed)
    feed = feeds(model)[0]          # data-free at the saved ranks: the very same weights
    assert max_rel_diff(run_model(decomposed, feed)[0], run_model(again.model, feed)[0]) < 1e-6


def test_fine_tuned_weights_load_into_the_structure(session, tmp_path):
    model = conv_chain(LAYERS)
    result = session.build({"passes": [{"pass": "decompose", "options": {"target": 0.5}}]}).run(
        model, output_dir=tmp_path)
    tuned = onnx.ModelProto()
    tuned.CopyFrom(result.model)
    rng = np.random.default_rng(9)
    children = {f"{c}.{suffix}" for names in result.artifacts["decomposition"].changes.values() for c in names
                for suffix in ("weight", "bias")}
    arrays = {}
    for tensor in tuned.graph.initializer:      # "fine-tune": perturb every child tensor
        if tensor.name in children:
            values = onnx.numpy_helper.to_array(tensor)
            arrays[tensor.name] = (values * (1 + 0.2 * rng.normal(size=values.shape))).astype(np.float32)
            tensor.CopyFrom(onnx.numpy_helper.from_array(arrays[tensor.name], tensor.name))
    np.savez(tmp_path / "tuned.npz", **arrays)
    info = str(tmp_path / "model_decompose_info.json")
    loaded = session.build({"passes": [{"pass": "apply_decomposition", "options": {
        "info_file": info, "weights": str(tmp_path / "tuned.npz")}}]}).run(model)
    feed = feeds(model)[0]
    assert max_rel_diff(run_model(tuned, feed)[0], run_model(loaded.model, feed)[0]) < 1e-6
    assert max_rel_diff(run_model(result.model, feed)[0], run_model(loaded.model, feed)[0]) > 1e-2
    del arrays["conv1.1.weight"]
    np.savez(tmp_path / "partial.npz", **arrays)
    with pytest.raises(PassError, match="conv1.1.weight: missing from the weights file"):
        session.build({"passes": [{"pass": "apply_decomposition", "options": {
            "info_file": info, "weights": str(tmp_path / "partial.npz")}}]}).run(model)


def test_amct_info_file_and_mismatches(session, tmp_path):
    model = conv_chain([{"cout": 16, "k": 3}])
    amct = {"conv0": {"ori_layer_info": {"name": "conv0", "in_channels": 8, "out_channels": 16, "kernel_size": 3,
                                         "stride": 1, "dilation": 1, "groups": 1},
                      "mode": "SCFK", "decom_nodes": {"first": {"weight_shape": [16, 8, 3, 1]},
                                                      "last": {"weight_shape": [16, 16, 1, 3]}}}}
    path = tmp_path / "amct.json"
    path.write_text(json.dumps(amct))
    result = session.build({"passes": [{"pass": "apply_decomposition", "options": {
        "info_file": str(path), "init": "zeros"}}]}).run(model)
    convs = [(n.name, [a.ints for a in n.attribute if a.name == "kernel_shape"][0]) for n in result.model.graph.node
             if n.op_type == "Conv"]
    assert convs == [("conv0.0", [3, 1]), ("conv0.1", [1, 3])]
    amct["conv0"]["ori_layer_info"]["out_channels"] = 32
    path.write_text(json.dumps(amct))
    with pytest.raises(PassError, match="out_channels: the file says 32 but the model's 'conv0' has 16"):
        session.build({"passes": [{"pass": "apply_decomposition", "options": {"info_file": str(path)}}]}).run(model)
    amct["conv0"]["ori_layer_info"]["out_channels"] = 16
    amct["conv0"]["decom_nodes"]["first"]["weight_shape"] = [99, 8, 3, 1]
    path.write_text(json.dumps(amct))
    with pytest.raises(PassError, match="no spatial_svd rank of layer 'conv0' gives child weight shapes"):
        session.build({"passes": [{"pass": "apply_decomposition", "options": {"info_file": str(path)}}]}).run(model)


def test_report_table_and_json(session, tmp_path):
    model = conv_chain([{"cout": 16, "k": 3}, {"cout": 8, "k": 1}])
    data = feeds(model, batches=2)
    result = _run(session, model, data=data, output_dir=tmp_path, dataset="calib",
                  target=0.5, data_aware=True, report_file="{model}_report.json")
    table = result.artifacts["decomposition"].report.table()
    assert "conv0" in table and "model output SQNR on 'calib' (4 samples)" in table
    assert "left alone: conv1: kernel 1x1 is too small" in table
    report = json.loads((tmp_path / "model_report.json").read_text())
    layer = report["layers"][0]
    assert layer["flops_after"] < layer["flops_before"] and 0 < layer["weight_error"] < 2
    assert report["flops_reduction"] >= 2 and layer["response_sqnr_db"] > 0
    # the model SQNR the report gives is the one onnxruntime shows on the calibration batches
    expected = sqnr([run_model(model, f)[0] for f in data], [run_model(result.model, f)[0] for f in data])
    assert report["output_sqnr_db"] == pytest.approx(expected, abs=1e-3)


def test_plot_png(session, tmp_path):
    pytest.importorskip("matplotlib")
    model = conv_chain([{"cout": 16, "k": 3}, {"cout": 8, "k": 3}])
    result = _run(session, model, data=feeds(model), output_dir=tmp_path, dataset="calib", target=0.5,
                  plot="{model}_tradeoff.png", plot_targets=[0.3, 0.7])
    png = tmp_path / "model_tradeoff.png"
    assert png in result.files and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_weights_from_an_onnx_model_are_read_like_an_input_model(session, tmp_path):
    """An .onnx weights file loads its initializers; its external data may not leave its folder."""
    model = conv_chain(LAYERS)
    result = session.build({"passes": [{"pass": "decompose", "options": {"target": 0.5}}]}).run(
        model, output_dir=tmp_path)
    info = str(tmp_path / "model_decompose_info.json")
    tuned = tmp_path / "tuned" / "tuned.onnx"
    tuned.parent.mkdir()
    tuned.write_bytes(result.model.SerializeToString())
    loaded = session.build({"passes": [{"pass": "apply_decomposition", "options": {
        "info_file": info, "weights": str(tuned)}}]}).run(model)
    feed = feeds(model)[0]
    assert max_rel_diff(run_model(result.model, feed)[0], run_model(loaded.model, feed)[0]) < 1e-6
    (tmp_path / "secret.bin").write_bytes(b"S" * (1 << 16))
    hostile = onnx.ModelProto()
    hostile.CopyFrom(result.model)
    target = max(hostile.graph.initializer, key=lambda t: len(t.raw_data))
    target.ClearField("raw_data")
    target.data_location = onnx.TensorProto.EXTERNAL
    target.external_data.add(key="location", value="../secret.bin")
    tuned.write_bytes(hostile.SerializeToString())
    with pytest.raises(Exception, match=r"'\.\.' to leave the model's folder"):
        session.build({"passes": [{"pass": "apply_decomposition", "options": {
            "info_file": info, "weights": str(tuned)}}]}).run(model)
