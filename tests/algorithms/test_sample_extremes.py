"""Calibrators over per-sample extremes (mean_minmax, sample_quantile) against numpy references."""
from __future__ import annotations

import numpy as np
import pytest

from amct_pipeline.algorithms.calibration import MeanMinMaxCalibrator, MinMaxCalibrator, SampleQuantileCalibrator
from amct_pipeline.algorithms.calibration.extremes import SampleExtremes, sample_extremes
from amct_pipeline.quant.math import scale_offset_from_range


def activations(seed: int = 0, batches: int = 7, batch: int = 5) -> list[np.ndarray]:
    """NCHW batches whose per-sample extremes vary a lot (a few samples with large outliers)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(batches):
        x = rng.normal(0.2, 1.0, size=(batch, 3, 6, 6)).astype(np.float32)
        x *= rng.uniform(0.5, 2.0, size=(batch, 1, 1, 1)).astype(np.float32)
        x[rng.integers(batch), 0, 0, 0] = rng.uniform(20.0, 40.0)
        out.append(x)
    return out


def per_sample(data) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate(data).reshape(sum(len(b) for b in data), -1).astype(np.float64)
    return x.min(axis=1), x.max(axis=1)


def run(cal, data, name: str = "t"):
    for b in data:
        cal.observe(name, b)
    return cal.finalize()[name]


@pytest.mark.parametrize("symmetric", [False, True])
def test_mean_minmax_matches_numpy(symmetric):
    data = activations()
    mins, maxs = per_sample(data)
    if symmetric:
        t = np.maximum(np.abs(mins), np.abs(maxs)).mean()
        expected = scale_offset_from_range(-t, t, 8, True)
    else:
        expected = scale_offset_from_range(mins.mean(), maxs.mean(), 8, False)
    got = run(MeanMinMaxCalibrator({"asymmetric": not symmetric}), data)
    assert got.offset == expected.offset and got.scale == pytest.approx(expected.scale, rel=1e-12)
    # the global range keeps the outliers; the per-sample mean does not
    assert got.clip_max < 0.5 * max(b.max() for b in data)


@pytest.mark.parametrize("q", [0.5, 0.9, 0.25])
@pytest.mark.parametrize("symmetric", [False, True])
def test_sample_quantile_matches_numpy(q, symmetric):
    data = activations(seed=1)
    mins, maxs = per_sample(data)
    if symmetric:
        t = np.quantile(np.maximum(np.abs(mins), np.abs(maxs)), q)
        expected = scale_offset_from_range(-t, t, 8, True)
    else:
        expected = scale_offset_from_range(np.quantile(mins, 1 - q), np.quantile(maxs, q), 8, False)
    got = run(SampleQuantileCalibrator({"quantile": q, "asymmetric": not symmetric}), data)
    assert got.offset == expected.offset and got.scale == pytest.approx(expected.scale, rel=1e-12)


def test_quantile_one_is_the_global_range():
    data = activations(seed=2)
    assert run(SampleQuantileCalibrator({"quantile": 1.0}), data) == run(MinMaxCalibrator(), data)


def test_result_depends_on_samples_not_on_batching():
    data = activations(seed=3)
    flat = np.concatenate(data)
    recut = [flat[i:i + 3] for i in range(0, len(flat), 3)]
    for cls in (MeanMinMaxCalibrator, SampleQuantileCalibrator):
        assert run(cls(), data) == run(cls(), recut)


def test_samples_are_slices_along_axis_zero_and_small_ranks_are_one_sample():
    mins, maxs = sample_extremes(np.arange(12, dtype=np.float32).reshape(3, 4))
    assert mins.tolist() == [0, 4, 8] and maxs.tolist() == [3, 7, 11]
    mins, maxs = sample_extremes(np.array([3.0, -1.0, 2.0], np.float32))
    assert mins.tolist() == [-1.0] and maxs.tolist() == [3.0]
    cal = MeanMinMaxCalibrator()
    cal.observe("v", np.array([0.0, 4.0], np.float32))      # one sample per rank-1 batch
    cal.observe("v", np.array([-2.0, 2.0], np.float32))
    assert cal.statistics("v").samples == 2
    assert (cal.statistics("v").mean_min, cal.statistics("v").mean_max) == (-1.0, 3.0)


def test_reservoir_is_bounded_exact_means_and_uniform_subsample():
    rng = np.random.default_rng(4)
    stats = SampleExtremes(capacity=256)
    size = stats.nbytes
    mins_all, maxs_all = [], []
    for _ in range(200):                                  # 200 batches of 16 samples = 3200 samples
        mins = rng.normal(-1.0, 0.1, 16)
        maxs = rng.gamma(2.0, 1.0, 16)
        stats.add_samples(mins, maxs, 16 * 100)
        mins_all.append(mins)
        maxs_all.append(maxs)
    mins_all, maxs_all = np.concatenate(mins_all), np.concatenate(maxs_all)
    assert stats.nbytes == size and stats.reservoir.shape == (256, 2)
    assert stats.samples == 3200 and stats.count == 3200 * 100
    assert stats.mean_max == pytest.approx(maxs_all.mean(), rel=1e-12)
    assert stats.mean_min == pytest.approx(mins_all.mean(), rel=1e-12)
    assert (stats.min, stats.max) == (mins_all.min(), maxs_all.max())
    # every kept pair is a real sample, and the subsample's quantiles are those of all samples
    assert set(map(float, stats.reservoir[:, 1])) <= set(map(float, maxs_all))
    for q in (0.5, 0.9):
        assert stats.quantiles(q)[1] == pytest.approx(np.quantile(maxs_all, q), rel=0.12)
    # reproducible: the generator is seeded
    again = SampleExtremes(capacity=256)
    rng = np.random.default_rng(4)
    for _ in range(200):
        again.add_samples(rng.normal(-1.0, 0.1, 16), rng.gamma(2.0, 1.0, 16), 1600)
    assert np.array_equal(again.reservoir, stats.reservoir)


def test_merge_equals_one_stream_while_exact():
    data = activations(seed=5)
    one, a, b = MeanMinMaxCalibrator(), MeanMinMaxCalibrator(), MeanMinMaxCalibrator()
    for i, x in enumerate(data):
        one.observe("t", x)
        (a if i % 2 else b).observe("t", x)
    merged = a.statistics("t")
    merged.merge(b.statistics("t"))
    whole = one.statistics("t")
    assert merged.samples == whole.samples and merged.count == whole.count
    assert merged.mean_max == pytest.approx(whole.mean_max) and merged.mean_min == pytest.approx(whole.mean_min)
    assert sorted(merged.reservoir[:, 1]) == sorted(whole.reservoir[:, 1])
