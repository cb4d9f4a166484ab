"""The example plugin's own tests: its pass and calibrator, through amct_pipeline's public API only.

Run with ``python -m pytest plugins/amct-pipeline-example/tests`` (part of the project's test run).
They test this checkout's source (``src`` first on the path), installed or not, and register the
plugin module with a hermetic Session.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

import amct_pipeline
from amct_pipeline.testing.models import make_model
from amct_pipeline.testing.numerics import run_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from amct_example import plugin  # noqa: E402  (this checkout's plugin, installed or not)


@pytest.fixture
def session():
    return amct_pipeline.Session(load_entrypoints=False, plugins=[plugin])


def identity_model():
    """x -> Identity -> Relu -> Identity -> y: the first Identity can go, the last names the output."""
    nodes = [helper.make_node("Identity", ["x"], ["a"], name="id0"),
             helper.make_node("Relu", ["a"], ["b"], name="relu"),
             helper.make_node("Identity", ["b"], ["y"], name="id1")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    return make_model(nodes, [x], [y])


def test_registered_through_the_hooks(session):
    assert session.lookup("passes", "strip_identity") is plugin.StripIdentityPass
    assert session.lookup("calibrators", "absmax") is plugin.AbsMaxCalibrator
    assert issubclass(plugin.StripIdentityPass, amct_pipeline.Pass)
    assert issubclass(plugin.AbsMaxCalibrator, amct_pipeline.ActivationCalibrator)


def test_strip_identity_keeps_outputs_and_numerics(session):
    model = identity_model()
    result = session.build("strip_identity").run(model)
    assert [n.op_type for n in result.model.graph.node] == ["Relu", "Identity"]
    assert [o.name for o in result.model.graph.output] == ["y"]
    assert result.stats_for("strip_identity") == {"removed": 1}
    feed = {"x": np.random.default_rng(0).normal(size=(2, 3)).astype(np.float32)}
    np.testing.assert_array_equal(run_model(model, feed)[0], run_model(result.model, feed)[0])


def test_strip_identity_leaves_a_model_without_identity_unmodified(session):
    model = identity_model()
    first = session.build("strip_identity").run(model).model
    again = session.build("strip_identity").run(first)
    assert again.stats_for("strip_identity") == {"removed": 0}


def test_absmax_is_the_running_max_times_the_margin():
    calibrator = plugin.AbsMaxCalibrator({"margin": 1.5})
    calibrator.observe("t", np.array([0.5, -2.0], np.float32))
    calibrator.observe("t", np.array([1.0], np.float32))
    params = calibrator.finalize()["t"]
    assert isinstance(params, amct_pipeline.ActQuantParams)
    assert params.offset == 0 and params.num_bits == 8 and params.scale == pytest.approx(2.0 * 1.5 / 127)


def test_absmax_options_are_checked(session):
    with pytest.raises(amct_pipeline.ConfigError, match="margin"):
        session.build("match_layers,calibrate{algorithm=absmax,algorithm_options={margin=3},dataset=calib}",
                      datasets=["calib"])
