"""Empirical bias correction (quantize_weights{bias_correction}) against a numpy reference."""
from __future__ import annotations

import numpy as np
import pytest

from amct_pipeline.demo import build_demo_data, build_demo_model
from amct_pipeline.errors import ConfigError
from amct_pipeline.pipeline.spec import DatasetSpec
from amct_pipeline.quant.math import fake_quant
from amct_pipeline.quant.weights import dequantize_weight, effective_bias, weight_values
from amct_pipeline.runtime.data import ArraySource


def _source(count: int = 48, batch_size: int = 16, seed: int = 1) -> ArraySource:
    return ArraySource("calib", {"x": build_demo_data(count, seed=seed)}, DatasetSpec(batch_size=batch_size), "test")


def _run(session, text: str, source=None):
    return session.build(text, datasets=["calib"]).run(build_demo_model(), datasets={"calib": source or _source()})


def _conv3x3(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Conv, 3x3 kernel, stride 1, zero padding 1, float64, no bias."""
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))   # N, C, H, W, 3, 3
    return np.einsum("nchwij,ocij->nohw", windows, w.astype(np.float64))


def test_bias_correction_removes_the_measured_mean_shift(session):
    """The corrected bias is the float bias minus the mean of (quantized layer - float layer) over the
    calibration data, checked in numpy on the first conv (its input is the model input)."""
    base = "fuse_bn,match_layers,calibrate{algorithm=mean_minmax}"
    plain = _run(session, base + ",quantize_weights")
    corrected = _run(session, base + ",quantize_weights{bias_correction=true bias_correction_input=quantized}")
    stats = corrected.stats_for("quantize_weights")
    assert stats["bias_corrected"] == 3 and "bias_not_corrected" not in stats
    layer = plain.artifacts["layer_map"]["conv1"]
    act = plain.artifacts["act_quant"]["conv1"]
    wq = plain.artifacts["weight_quant"]["conv1"]
    x = build_demo_data(48)
    w = weight_values(plain.graph, layer)
    w_q = dequantize_weight(wq.quantized, wq.scale, layer)
    assert plain.graph.node("conv1").attrs["pads"] == [1, 1, 1, 1]
    shift = (_conv3x3(fake_quant(x, act), w_q) - _conv3x3(x, w)).mean(axis=(0, 2, 3))
    before = effective_bias(plain.graph, layer)
    after = effective_bias(corrected.graph, corrected.artifacts["layer_map"]["conv1"])
    np.testing.assert_allclose(after, before - shift, rtol=0, atol=2e-5 * np.abs(before).max())
    assert plain.model.graph.initializer and corrected.model is not plain.model


def test_bias_correction_of_the_weights_alone(session):
    """By default the layer reads its float input: the shift is that of the weights' rounding alone
    (checked on the first conv); the dataset is checked when given."""
    result = _run(session, "fuse_bn,match_layers,quantize_weights{bias_correction=true batch_num=2}")
    assert result.stats_for("quantize_weights")["bias_corrected"] == 3
    plain = _run(session, "fuse_bn,match_layers,quantize_weights")
    layer = plain.artifacts["layer_map"]["conv1"]
    wq = plain.artifacts["weight_quant"]["conv1"]
    x = build_demo_data(48)[:32]                      # batch_num=2 batches of 16
    w = weight_values(plain.graph, layer)
    shift = _conv3x3(x, dequantize_weight(wq.quantized, wq.scale, layer) - w).mean(axis=(0, 2, 3))
    after = effective_bias(result.graph, result.artifacts["layer_map"]["conv1"])
    before = effective_bias(plain.graph, layer)
    np.testing.assert_allclose(after, before - shift, rtol=0, atol=2e-5 * np.abs(before).max())
    with pytest.raises(ConfigError, match="dataset 'other'"):
        session.build("fuse_bn,match_layers,quantize_weights{bias_correction=true dataset=other}",
                      datasets=["calib"])
