"""retrain: block reconstruction against the float model, checked through onnxruntime.

The models are small (the demo model: Conv-BN-Relu x2, a residual Add, pooling, Gemm) so that a few
dozen steps run in seconds; quality is measured on the lowered QDQ / fake-quant models in onnxruntime.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from amct_pipeline.demo import build_demo_data, build_demo_model
from amct_pipeline.errors import AmctError, ConfigError
from amct_pipeline.pipeline.instruments import PassInstrument
from amct_pipeline.pipeline.spec import DatasetSpec
from amct_pipeline.runtime.data import ArraySource
from amct_pipeline.runtime.ort import make_session
from test_lower import assert_float32_equal, run_ort, simulate

BASE = "fuse_bn,match_layers,calibrate{algorithm=ifmr},"
LOWER = ",lower{targets=[fakequant,qdq]}"


def _source(count: int = 48) -> ArraySource:
    return ArraySource("calib", {"x": build_demo_data(count)}, DatasetSpec(batch_size=16), "test")


def _run(session, retrain: str, count: int = 48):
    pipeline = session.build(BASE + retrain + LOWER, datasets=["calib"])
    return pipeline.run(build_demo_model(), datasets={"calib": _source(count)})


def _sqnr_db(result, target: str, x: np.ndarray) -> float:
    """Against the float model as given (``result.model`` holds the learned biases)."""
    reference = make_session(build_demo_model()).run(None, {"input": x})[0].astype(np.float64)
    got = make_session(result.artifacts["lowered"][target]).run(None, {"input": x})[0].astype(np.float64)
    return float(10 * np.log10(np.square(reference).sum() / np.square(got - reference).sum()))


def test_retrain_beats_round_to_nearest_at_int4(session):
    """W4A8 on the demo model: learned clips, rounding and biases beat ARQ round-to-nearest with IFMR
    clips, on held-out inputs, in the QDQ and the fake-quant models onnxruntime runs."""
    held_out = build_demo_data(96)[48:]
    nearest = _run(session, "retrain{weight_bits=4 wts_algo=arq steps=0}")
    learned = _run(session, "retrain{weight_bits=4 steps=120 block_layers=1}")
    for target in ("qdq", "fakequant"):
        before, after = _sqnr_db(nearest, target, held_out), _sqnr_db(learned, target, held_out)
        assert after > before + 0.5, (target, before, after)
    stats = learned.stats_for("retrain")
    assert stats["blocks"] >= 2 and len(stats["block_seconds"]) == stats["blocks"]
    assert all(a >= b for a, b in zip(stats["block_db_after"], stats["block_db_before"]))
    codes = [p.quantized for p in learned.artifacts["weight_quant"].values() if p.quantized.size]
    assert all(c.dtype == np.int8 and c.min() >= -8 and c.max() <= 7 for c in codes)
    assert {p.num_bits for p in learned.artifacts["weight_quant"].values() if p.quantized.size} == {4}


def test_same_seed_gives_byte_identical_models(session):
    text = "retrain{steps=30 seed=7 block_layers=1}"
    a, b = _run(session, text), _run(session, text)
    for target in ("qdq", "fakequant"):
        assert a.artifacts["lowered"][target].SerializeToString() == b.artifacts["lowered"][target].SerializeToString()
    c = _run(session, "retrain{steps=30 seed=8 block_layers=1}")
    assert c.artifacts["lowered"]["qdq"].SerializeToString() != a.artifacts["lowered"]["qdq"].SerializeToString()


@pytest.mark.parametrize("bits", [8, 4])
def test_retrained_fakequant_model_equals_integer_simulation_of_its_record(session, bits):
    x = build_demo_data(8)
    result = _run(session, f"retrain{{steps=30 block_layers=1 weight_bits={bits}}}")
    float_model = result.model           # after fuse_bn and retraining: the graph (learned biases) the record belongs to
    outputs = [o.name for o in float_model.graph.output]
    expected = simulate(float_model, result.artifacts["quant_record"], x, outputs)
    actual = run_ort(result.artifacts["lowered"]["fakequant"], x, level="none")
    for name, a, e in zip(outputs, actual, expected):
        assert_float32_equal(a, e, f"output '{name}'")


def test_artifacts_as_ptq_and_amct_files(session, tmp_path):
    """act_quant / weight_quant / record as PTQ gives them; export_amct writes the record; a Relu
    producer fixes clip_min at 0 (AMCT's fixed_min rule)."""
    pipeline = session.build(BASE + "retrain{steps=10}" + LOWER + ",export_amct", datasets=["calib"])
    result = pipeline.run(build_demo_model(), datasets={"calib": _source()}, output_dir=tmp_path)
    act, weights = result.artifacts["act_quant"], result.artifacts["weight_quant"]
    assert list(act) == ["conv1", "conv2", "fc"] and set(weights) == set(act)
    assert act["conv2"].offset == -128 and act["fc"].offset == -128      # inputs produced by Relu / after Relu
    assert set(result.artifacts["quant_record"]) == {"conv1", "conv2", "fc"}
    assert any(p.name.endswith("record.txt") for p in tmp_path.iterdir())
    assert not any(p.name.startswith(".amct-retrain") for p in tmp_path.iterdir())     # spill folder removed


def test_amct_json_config_given_clips_and_disabled_layer(session, tmp_path):
    config = tmp_path / "retrain.json"
    config.write_text(json.dumps({
        "version": 1, "batch_num": 1,
        "conv1": {"retrain_enable": True, "retrain_data_config": {"algo": "ulq_quantize", "clip_max": 3.0,
                                                                    "clip_min": -2.5},
                  "retrain_weight_config": {"algo": "ulq_retrain", "channel_wise": True, "dst_type": "INT8"}},
        "fc": {"retrain_enable": False}}))
    result = _run(session, f"retrain{{config=\"{config}\" steps=0}}")
    act = result.artifacts["act_quant"]
    assert "fc" not in act and "fc" not in result.artifacts["weight_quant"]      # left float
    assert act["conv1"].clip_max == pytest.approx(3.0, rel=1e-2) and act["conv1"].clip_min == pytest.approx(-2.5, rel=2e-2)
    assert result.stats_for("retrain")["weight_algorithms"] == {"ulq_retrain": 1, "arq_retrain": 1}


def test_ada_and_ulq_retrain_beat_round_to_nearest(session):
    x = build_demo_data(96)[48:]
    nearest = _run(session, "retrain{weight_bits=4 wts_algo=arq steps=0}")
    for algo in ("ada", "ulq_retrain"):
        result = _run(session, f"retrain{{weight_bits=4 wts_algo={algo} steps=80 block_layers=1}}")
        assert _sqnr_db(result, "qdq", x) > _sqnr_db(nearest, "qdq", x), algo


@pytest.mark.parametrize("entry, message", [
    ({"act": {"clip_max": 0.0}}, "layer 'conv1'.act.clip_max"),
    ({"act": {"clip_max": -1.0}}, "layer 'conv1'.act.clip_max"),
    ({"act": {"clip_min": 0.5}}, "layer 'conv1'.act.clip_min"),
    ({"act": {"clip_min": 0.0}}, "layer 'conv1'.act.clip_min"),
    ({"act": {"algo": "lsq"}}, "layer 'conv1'.act.algo"),
    ({"wts": {"algo": "adaround"}}, "layer 'conv1'.wts.algo"),
    ({"wts": {"dst_type": "INT16"}}, "layer 'conv1'.wts.dst_type"),
    ({"act": {"dst_type": "INT4"}}, "layer 'conv1'.act.dst_type"),
    ({"wts": {"channel": True}}, "layer 'conv1'.wts.channel"),
])
def test_bad_layer_values_fail_when_the_pipeline_is_built(session, entry, message):
    """Before any model runs (session.build), one line naming the layer and the field."""
    text = BASE + "retrain{layers=" + json.dumps({"conv1": entry}).replace('"', "").replace(":", "=") \
        .replace(",", " ") + "}" + LOWER
    with pytest.raises(ConfigError) as info:
        session.build(text, datasets=["calib"])
    assert message in str(info.value) and "\n" not in str(info.value).strip()


@pytest.mark.parametrize("act, message", [
    ({"clip_max": -1.0}, "conv1.retrain_data_config.clip_max"),
    ({"clip_min": 1.0}, "conv1.retrain_data_config.clip_min"),
    ({"algo": "ulq"}, "conv1.retrain_data_config.algo"),
])
def test_bad_amct_config_values_fail_when_the_pipeline_is_built(session, tmp_path, act, message):
    config = tmp_path / "retrain.json"
    config.write_text(json.dumps({"version": 1, "conv1": {"retrain_data_config": act}}))
    with pytest.raises(ConfigError) as info:
        session.build(BASE + f"retrain{{config=\"{config}\"}}" + LOWER, datasets=["calib"])
    assert message in str(info.value)


def test_int16_weights_in_amct_config_and_unknown_layer(session, tmp_path):
    config = tmp_path / "retrain.json"
    config.write_text(json.dumps({"version": 1, "conv1": {"retrain_weight_config": {"dst_type": "INT16"}}}))
    with pytest.raises(ConfigError, match="conv1.retrain_weight_config.dst_type"):
        session.build(BASE + f"retrain{{config=\"{config}\"}}" + LOWER, datasets=["calib"])
    with pytest.raises(AmctError, match="layers.nope: is not a matched layer"):
        _run(session, "retrain{layers={nope={act={clip_max=1.0}}}}")


def test_options_are_bounded(session):
    for option in ("steps=100000", "max_samples=100000", "batch_size=100000"):
        with pytest.raises(ConfigError):
            session.build(BASE + f"retrain{{{option}}}" + LOWER, datasets=["calib"])


def test_spill_to_disk_gives_the_same_model(session, tmp_path):
    """Block activations memory-mapped under the output folder train the same model as in memory."""
    text = BASE + "retrain{steps=20 block_layers=1 spill_mb=1}" + LOWER
    in_memory = _run(session, "retrain{steps=20 block_layers=1}", count=48)
    spilled = session.build(text, datasets=["calib"]).run(build_demo_model(), datasets={"calib": _source(48)},
                                                          output_dir=tmp_path)
    # the models' metadata holds the pipeline text, which differs; the graphs do not
    assert in_memory.artifacts["lowered"]["qdq"].graph.SerializeToString() == \
        spilled.artifacts["lowered"]["qdq"].graph.SerializeToString()
    assert isinstance(spilled.artifacts["lowered"]["qdq"], onnx.ModelProto)


def test_match_layers_precision_sets_the_layer_weight_bits(session):
    """match_layers{precision} gives one layer INT4 weights; the others keep the pass's 8 bits."""
    text = ("fuse_bn,match_layers{precision={conv2={wts=4}}},calibrate{algorithm=ifmr},retrain{steps=5}" + LOWER)
    result = session.build(text, datasets=["calib"]).run(build_demo_model(), datasets={"calib": _source()})
    bits = {name: p.num_bits for name, p in result.artifacts["weight_quant"].items()}
    assert bits == {"conv1": 8, "conv2": 4, "fc": 8}
    assert result.artifacts["quant_settings"]["conv2"]["wts"]["num_bits"] == 4


def test_amct_retrain_cfg(session, tmp_path):
    """The simplified .cfg: types and layers resolved separately; skipped layers stay float; an INT4
    activation is an error naming the layer and field before the pass runs the model."""
    cfg = tmp_path / "retrain.cfg"
    cfg.write_text('retrain_weight_quant_config { arq_retrain { channel_wise: false } }\n'
                   'override_layer_types { layer_type: "Conv" retrain_weight_quant_config { ulq_retrain { '
                   'channel_wise: true } } }\nquant_skip_layers: "fc"\n')
    result = _run(session, f"retrain{{config=\"{cfg}\" steps=5}}")
    assert result.stats_for("retrain")["weight_algorithms"] == {"ulq_retrain": 2}
    assert "fc" not in result.artifacts["act_quant"]
    cfg.write_text('override_layer_configs { layer_name: "conv2" retrain_data_quant_config { ulq_quantize { '
                   'dst_type: INT4 } } }\n')
    ran = _PassesRun()
    pipeline = session.build(BASE + f"retrain{{config=\"{cfg}\" steps=5}}" + LOWER, datasets=["calib"])
    with pytest.raises(AmctError, match="layer 'conv2'.act.dst_type: INT4 activations are not supported"):
        pipeline.run(build_demo_model(), datasets={"calib": _source()}, instruments=[ran])
    assert ran.names == []                        # refused before fuse_bn / calibrate ran the model


class _PassesRun(PassInstrument):
    def __init__(self) -> None:
        self.names: list[str] = []

    def before_pass(self, index, pass_, graph) -> None:
        self.names.append(pass_.name)


@pytest.mark.parametrize("box", [(3, 5, 20, 17), (0, 0, 32, 32), (10, 2, 7, 30)])
def test_resized_crop_is_onnx_resize_of_the_box(box):
    """The augmentation's crop-and-resize equals onnxruntime's Resize (linear, half_pixel) of the box."""
    from onnx import TensorProto, helper, numpy_helper
    from amct_pipeline.algorithms.reconstruct import resized_crop
    top, left, h, w = box
    image = np.random.default_rng(0).standard_normal((3, 32, 32)).astype(np.float32)
    sizes = numpy_helper.from_array(np.array([1, 3, 32, 32], np.int64), "sizes")
    node = helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="linear",
                            coordinate_transformation_mode="half_pixel")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, h, w])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [sizes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    expected = make_session(model).run(None, {"x": image[None, :, top:top + h, left:left + w]})[0][0]
    np.testing.assert_allclose(resized_crop(image, top, left, h, w), expected, rtol=0, atol=1e-5)


def test_augment_images_flips_and_crops_deterministically():
    from amct_pipeline.algorithms.reconstruct import augment_images
    x = build_demo_data(6)
    flipped = augment_images(x, 2, True, 1.0, np.random.default_rng(3))
    assert flipped.shape == (18, 3, 32, 32)
    np.testing.assert_array_equal(flipped[:6], x)
    for i, copy in enumerate(flipped[6:]):
        assert np.array_equal(copy, x[i % 6]) or np.array_equal(copy, x[i % 6][:, :, ::-1])
    assert any(not np.array_equal(c, x[i % 6]) for i, c in enumerate(flipped[6:]))
    cropped = augment_images(x, 1, False, 0.3, np.random.default_rng(3))
    assert not np.allclose(cropped[6:], x)
    assert cropped[6:].min() >= x.min() - 1e-5 and cropped[6:].max() <= x.max() + 1e-5     # convex combinations
    np.testing.assert_array_equal(cropped, augment_images(x, 1, False, 0.3, np.random.default_rng(3)))


def test_qdrop_and_augment_are_deterministic_and_change_the_training(session):
    text = "retrain{steps=20 seed=3 block_layers=1 qdrop=0.5 augment={copies=2 crop=0.5}}"
    a, b = _run(session, text, count=16), _run(session, text, count=16)
    assert a.artifacts["lowered"]["qdq"].SerializeToString() == b.artifacts["lowered"]["qdq"].SerializeToString()
    assert a.stats_for("retrain")["samples"] == 48            # 16 samples and two augmented copies each
    plain = _run(session, "retrain{steps=20 seed=3 block_layers=1}", count=16)
    no_drop = _run(session, "retrain{steps=20 seed=3 block_layers=1 augment={copies=2 crop=0.5}}", count=16)
    models = {r.artifacts["lowered"]["qdq"].SerializeToString() for r in (a, plain, no_drop)}
    assert len(models) == 3


def test_block_input_float_and_mixed_train_other_models_deterministically(session):
    base = "retrain{steps=15 seed=2 block_layers=1"
    models = {}
    for extra in ("", " block_input=float", " block_input=mixed qdrop=0.5", " block_input=mixed qdrop=0.5"):
        result = _run(session, base + extra + "}", count=16)
        models.setdefault(extra, set()).add(result.artifacts["lowered"]["qdq"].SerializeToString())
    assert all(len(v) == 1 for v in models.values())            # the same seed: the same model
    assert len({next(iter(v)) for v in models.values()}) == 3     # each input choice trains another model


@pytest.mark.parametrize("option", ["qdrop=1.0", "qdrop=-0.1", "augment={copies=100}", "augment={crop=0}",
                                    "augment={flop=true}", "block_input=mixed", "block_input=both"])
def test_qdrop_and_augment_options_are_checked(session, option):
    with pytest.raises(ConfigError):
        session.build(BASE + f"retrain{{{option}}}" + LOWER, datasets=["calib"])


def test_split_holdout_keeps_held_out_samples_and_their_copies_out_of_training():
    from amct_pipeline.algorithms.reconstruct import split_holdout
    train, held = split_holdout(30, 10, 3)          # 10 originals, two augmented copies each
    assert held.tolist() == [7, 8, 9]               # the last originals, not their copies
    assert not set(train) & {7, 8, 9, 17, 18, 19, 27, 28, 29}
    assert len(train) == 21 and sorted(set(train) | set(held) | {17, 18, 19, 27, 28, 29}) == list(range(30))
    train, held = split_holdout(12, 12, 0)
    assert train.tolist() == list(range(12)) and held.size == 0


def test_holdout_is_deterministic_and_never_worse_on_the_held_out_samples(session):
    """Each block keeps the values with the least error on the held-out samples: the start is one
    of them, so every block's held-out choice is at least as good as its start there; a learning
    rate that wrecks training on the trained samples is then undone."""
    text = "retrain{steps=50 seed=4 block_layers=1 holdout=0.34 lr_weight=0.5 lr_clip=0.5 learn_bias=false}"
    a, b = _run(session, text, count=24), _run(session, text, count=24)
    assert a.artifacts["lowered"]["qdq"].SerializeToString() == b.artifacts["lowered"]["qdq"].SerializeToString()
    wild = _run(session, "retrain{steps=50 seed=4 block_layers=1 lr_weight=0.5 lr_clip=0.5 learn_bias=false}",
                count=24)
    start = _run(session, "retrain{steps=0}", count=24)
    held = build_demo_data(24)[16:]               # the held-out samples of the holdout run (round(0.34 * 24) = 8)
    assert _sqnr_db(a, "qdq", held) >= _sqnr_db(start, "qdq", held) - 0.05
    assert a.artifacts["lowered"]["qdq"].SerializeToString() != wild.artifacts["lowered"]["qdq"].SerializeToString()


@pytest.mark.parametrize("option", ["holdout=-0.1", "holdout=0.6", "holdout=20"])
def test_holdout_is_checked(session, option):
    with pytest.raises(ConfigError):
        session.build(BASE + f"retrain{{{option}}}" + LOWER, datasets=["calib"])


def test_holdout_counts_and_a_single_sample_is_an_error(session):
    from amct_pipeline.passes.retrain import held_out_count
    assert [held_out_count(n, 0.2) for n in (1, 2, 32, 100)] == [1, 1, 6, 20]
    assert held_out_count(100, 0.0) == 0
    with pytest.raises(AmctError, match="holdout: holding out 1 of the 1 samples"):
        _run(session, "retrain{steps=5 holdout=0.2 max_samples=1}")


def test_retraining_after_bias_correction_distils_the_float_model(session):
    """Bias correction shifts the graph's biases for the quantized model; retraining's targets are the
    float model as given (``float_reference``), so before any step the report's output SQNR is the
    QDQ model's against the input model in onnxruntime (int32 biases aside; it was the shifted graph's)."""
    text = "quantize_weights{algorithm=arq bias_correction=true},retrain{steps=0 block_layers=64}"
    result = _run(session, text, count=32)
    assert result.artifacts["float_values"]
    internal = result.stats_for("retrain")["block_db_before"][0]
    assert internal == pytest.approx(_sqnr_db(result, "qdq", build_demo_data(32)), abs=0.2)   # was 6.6 dB off


def test_passes_after_retraining_measure_against_the_float_model(session):
    """Retraining writes learned weights and biases into the graph for the quantized model; it records
    their float values (``float_values``), so a later pass's float reference is still the input model:
    a second retrain's starting SQNR is its QDQ model's against the input model."""
    text = "quantize_weights{algorithm=arq},retrain{steps=30 block_layers=64},retrain{steps=0 block_layers=64}"
    result = _run(session, text, count=32)
    assert result.artifacts["float_values"]
    internal = [s for name, s in result.stats if name == "retrain"][1]["block_db_before"][0]
    assert internal == pytest.approx(_sqnr_db(result, "qdq", build_demo_data(32)), abs=0.2)


def test_average_keeps_a_moving_average_of_the_steps(session):
    """``average``: the values kept are an exponential moving average of the steps' from the start: the
    same seed gives the same model, and it moves less from the start than the last step's values."""
    from onnx import numpy_helper

    def floats(result):
        return {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer if i.data_type == 1}

    start = floats(_run(session, "retrain{steps=0 block_layers=64}", count=16))
    plain = floats(_run(session, "retrain{steps=40 seed=1 block_layers=64}", count=16))
    averaged = [_run(session, "retrain{steps=40 seed=1 block_layers=64 average=0.95}", count=16) for _ in range(2)]
    assert averaged[0].model.SerializeToString() == averaged[1].model.SerializeToString()

    def moved(values):
        return sum(float(np.abs(values[k] - start[k]).sum()) for k in start)
    assert 0 < moved(floats(averaged[0])) < 0.9 * moved(plain)
    with pytest.raises(ConfigError):
        session.build(BASE + "retrain{average=1.0}" + LOWER, datasets=["calib"])


def _scaled_channel_model(factor: float) -> onnx.ModelProto:
    """x -> Conv (4 -> 6) -> Mul by a per-channel constant -> y; output channel 0's filter and bias
    divided by ``factor`` and its multiplier times ``factor``: the same function for every factor."""
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((6, 4, 3, 3)) * 0.3).astype(np.float32)
    b = (rng.standard_normal(6) * 0.1).astype(np.float32)
    k = np.ones((1, 6, 1, 1), np.float32)
    w[0], b[0], k[0, 0] = w[0] / factor, b[0] / factor, factor
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Mul", ["c", "k"], ["y"], name="gain")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"), numpy_helper.from_array(k, "k")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_weights_learn_relative_to_each_channels_step(session):
    """A channel scaled down 16x (as channel equalization scales depthwise filters) and scaled back
    after the layer moves as far, in its own quantization steps, as unscaled: each channel's learning
    rate is its own step's (with one rate per layer, the mean step's, it moved twice as far here)."""
    rng = np.random.default_rng(6)
    mix = rng.standard_normal((4, 4)) + 2.0                     # correlated input channels: learning gains
    x = (np.einsum("oc,nchw->nohw", mix, rng.standard_normal((32, 4, 6, 6))) / 4).astype(np.float32)
    moves = []
    for factor in (1.0, 16.0):
        model = _scaled_channel_model(factor)
        pipeline = session.build("match_layers,calibrate{algorithm=ifmr},retrain{weight_bits=4 steps=100 block_layers=1}",
                                 datasets=["calib"])
        result = pipeline.run(model, datasets={"calib": ArraySource("calib", {"x": x}, DatasetSpec(batch_size=16), "test")})
        start = numpy_helper.to_array(model.graph.initializer[0])
        learned = next(numpy_helper.to_array(i) for i in result.model.graph.initializer if i.name == "w")
        step = np.abs(start).reshape(6, -1).max(axis=1) / 7                # INT4 ARQ step per channel
        moves.append(np.abs(learned - start).reshape(6, -1).mean(axis=1) / step)
        assert result.stats_for("retrain")["block_db_after"][0] > result.stats_for("retrain")["block_db_before"][0]
    assert moves[0].min() > 0.02                                     # the weights did move
    np.testing.assert_allclose(moves[1], moves[0], rtol=0.1)
