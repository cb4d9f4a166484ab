"""auto_calibrate: AMCT's BinarySearch, raise_precision, one-line errors, and resume after SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from amct_pipeline.algorithms.autocal import AutoCalibrationEvaluatorBase, binary_search
from amct_pipeline.demo import build_demo_data, build_demo_model
from amct_pipeline.errors import AmctError, ConfigError
from amct_pipeline.pipeline.spec import DatasetSpec
from amct_pipeline.runtime.data import ArraySource
from amct_pipeline.runtime.ort import run_model

PTQ = "fuse_bn,match_layers,calibrate,quantize_weights"
EVALUATOR = '''
import os, time
import numpy as np
from amct_pipeline.algorithms.autocal import AutoCalibrationEvaluatorBase
from amct_pipeline.demo import build_demo_data
from amct_pipeline.runtime.ort import run_model

class SqnrEvaluator(AutoCalibrationEvaluatorBase):
    """metric: output SQNR (dB) against the float model FLOAT_MODEL (stateless: a restart may skip calls)."""
    def __init__(self):
        self.x = build_demo_data(32, seed=5)
        self.ref = run_model(os.environ["FLOAT_MODEL"], {"input": self.x})[0]
        self.target = float(os.environ["SQNR_TARGET"])
    def evaluate(self, model_file):
        out = run_model(model_file, {"input": self.x})[0]
        time.sleep(float(os.environ.get("EVAL_SLEEP", "0")))
        return float(-10 * np.log10(max(np.sum((out - self.ref) ** 2) / np.sum(self.ref ** 2), 1e-20)))
    def metric_eval(self, original, new):
        return new >= self.target, original - new
'''


class SqnrEvaluator(AutoCalibrationEvaluatorBase):
    """Output SQNR against the float model; counts its calls."""

    def __init__(self, target: float) -> None:
        self.x, self.ref, self.target, self.calls = build_demo_data(32, seed=5), None, target, []

    def evaluate(self, model_file):
        out = run_model(model_file, {"input": self.x})[0]
        self.calls.append(model_file)
        if self.ref is None:
            self.ref = out
            return 200.0
        return float(-10 * np.log10(max(np.sum((out - self.ref) ** 2) / np.sum(self.ref ** 2), 1e-20)))

    def metric_eval(self, original, new):
        return new >= self.target, original - new


def _source() -> ArraySource:
    return ArraySource("calib", {"x": build_demo_data(48, seed=1)}, DatasetSpec(batch_size=16), "test")


# fc calibrated at the 90th percentile: clipped hard, the most sensitive layer, and rolling it back helps
SENSITIVE_FC = [{"match": {"name": "fc"}, "options": {"calibrate": {"algorithm": "percentile",
                                                                    "algorithm_options": {"percentile": 90}}}}]
PIPELINE = {"schema_version": 1, "datasets": {"calib": {"reader": "npy", "batch_size": 16}}, "passes": [
    {"pass": "fuse_bn"}, {"pass": "match_layers", "options": {"overrides": SENSITIVE_FC}}, {"pass": "calibrate"},
    {"pass": "quantize_weights"},
    {"pass": "auto_calibrate", "options": {"evaluator": "autocal_eval_mod:SqnrEvaluator", "targets": ["fakequant"]}}]}


def _run(session, evaluator, output_dir=None, weights=None, **options):
    passes = [session.make_pass("fuse_bn"), session.make_pass("match_layers", overrides=SENSITIVE_FC),
              session.make_pass("calibrate"), session.make_pass("quantize_weights", **(weights or {}))]
    passes.append(session.make_pass("auto_calibrate", evaluator=evaluator, **options))
    return session.pipeline(passes).run(build_demo_model(), datasets={"calib": _source()}, output_dir=output_dir)


def _global_sqnr(session) -> float:
    evaluator = SqnrEvaluator(0.0)
    result = _run(session, evaluator, targets=["fakequant"])
    return result.artifacts["auto_calibration"]["global_metric"]


def test_binary_search_is_amcts():
    seen = []

    def needs(k):
        return lambda count: seen.append(count) or count >= k
    for n in range(1, 12):
        for k in range(1, n + 1):
            seen.clear()
            assert binary_search(n, needs(k)) == k
            assert len(seen) <= n.bit_length() + 1
        assert binary_search(n, lambda count: False) is None
    seen.clear()
    binary_search(7, needs(2))
    assert seen[0] == 4          # mid = (0 + 6) // 2: roll back layers [0..3] first, as AMCT


def test_rolls_back_the_fewest_most_sensitive_layers(session, tmp_path):
    whole = _global_sqnr(session)
    evaluator = SqnrEvaluator(whole + 5)            # the fully quantized model is not good enough
    result = _run(session, evaluator, tmp_path)
    record = result.artifacts["auto_calibration"]
    rolled = record["result"]["layers"]
    ranking = list(json.loads((tmp_path / "accuracy_based_auto_calibration_ranking_information.json").read_text()))
    assert rolled == ranking[:len(rolled)] and 0 < len(rolled) < len(ranking)
    assert record["result"]["metric"] >= whole + 5 and rolled[0] == "fc"
    # no shorter prefix satisfied: every tried prefix shorter than the answer failed
    assert all(not t["satisfied"] for t in record["trials"] if len(t["changed"]) < len(rolled))
    config = json.loads((tmp_path / "accuracy_based_auto_calibration_final_config.json").read_text())
    assert [n for n in ranking if not config[n]["quant_enable"]] == rolled
    assert set(result.artifacts["act_quant"]) == set(ranking) - set(rolled)
    # the final fake-quant model is the one evaluated: same metric
    final = tmp_path / "model_fake_quant_model.onnx"
    assert (tmp_path / "model_deploy_model.onnx").is_file()
    assert evaluator.evaluate(str(final)) == pytest.approx(record["result"]["metric"], abs=1e-4)
    assert not list(tmp_path.glob(".amct-autocal-*"))          # the memo goes once the run succeeded


def test_raise_precision_stays_within_the_bitops_budget(session, tmp_path):
    whole = _global_sqnr(session)
    evaluator = SqnrEvaluator(whole + 5)
    result = _run(session, evaluator, tmp_path, strategy="raise_precision", bitops_budget=3.0, targets=["fakequant"])
    record = result.artifacts["auto_calibration"]
    assert record["result"]["layers"] and record["result"]["metric"] >= whole + 5
    assert record["result"]["bitops"] <= 3.0 * record["bitops_asked"]
    act = result.artifacts["act_quant"]
    assert {act[n].num_bits for n in record["result"]["layers"]} == {16}
    assert all(act[n].num_bits == 8 for n in act if n not in record["result"]["layers"])
    config = json.loads((tmp_path / "accuracy_based_auto_calibration_final_config.json").read_text())
    assert all(config[n]["activation_quant_params"]["num_bits"] == 16 for n in record["result"]["layers"])
    with pytest.raises(AmctError, match="bitops_budget"):
        _run(session, SqnrEvaluator(whole + 5), tmp_path / "tight", strategy="raise_precision", bitops_budget=1.0)
    assert not (tmp_path / "tight").exists() or not [p for p in (tmp_path / "tight").iterdir()
                                                      if not p.name.startswith(".")]


def test_the_original_metric_is_the_float_models_after_bias_correction(session, tmp_path):
    evaluator = SqnrEvaluator(0.0)
    _run(session, evaluator, tmp_path, weights={"bias_correction": True}, targets=["fakequant"])
    model = build_demo_model()
    expected = run_model(model, {model.graph.input[0].name: evaluator.x})[0]
    # the first model evaluated is the float one: the input model's function, not the corrected biases'
    assert np.abs(evaluator.ref - expected).max() <= 1e-4 * np.abs(expected).max()


class _Raises(SqnrEvaluator):
    def evaluate(self, model_file):
        raise RuntimeError("dataset server down")


class _Text(SqnrEvaluator):
    def evaluate(self, model_file):
        return "good"


@pytest.mark.parametrize("evaluator, message", [
    (_Raises(0), r"evaluator '_Raises'.evaluate raised RuntimeError: dataset server down"),
    (_Text(0), r"evaluate returned str 'good', not a number"),
    (SqnrEvaluator(150), r"no configuration meets the evaluator's metric \(even 2 of 3 layers rolled back"),
    (SqnrEvaluator(1e9), r"metric_eval\(original, original\) is not acceptable"),
    (object(), r"has no evaluate, metric_eval method"),
])
def test_bad_evaluators_are_one_line_errors_and_save_nothing(session, tmp_path, evaluator, message):
    with pytest.raises(AmctError, match=message) as info:
        _run(session, evaluator, tmp_path / "out")
    assert "\n" not in str(info.value)
    written = [p for p in (tmp_path / "out").rglob("*") if ".amct" not in str(p)] if (tmp_path / "out").exists() else []
    assert written == []


def test_evaluator_spec_is_checked_before_running(session):
    with pytest.raises(ConfigError, match="module:Class"):
        session.build(PTQ + ",auto_calibrate{evaluator=not-a-module}", datasets=["calib"])
    with pytest.raises(AmctError, match="cannot import"):
        _run(session, "no_such_module_here:Evaluator")


def test_a_missing_evaluator_fails_before_any_pass_runs(session):
    from amct_pipeline.pipeline.instruments import PassInstrument

    class Ran(PassInstrument):
        def __init__(self) -> None:
            self.names: list[str] = []

        def before_pass(self, index, pass_, graph) -> None:
            self.names.append(pass_.name)
    ran = Ran()
    with pytest.raises(ConfigError, match="no evaluator given; set options.evaluator"):
        session.build(PTQ + ",auto_calibrate", datasets=["calib"]).run(
            build_demo_model(), datasets={"calib": _source()}, instruments=[ran])
    assert ran.names == []


def _cli(tmp_path: Path, out: Path, target: float) -> subprocess.Popen:
    model, data, pipeline = tmp_path / "demo.onnx", tmp_path / "calib.npy", tmp_path / "autocal.json"
    if not model.exists():
        onnx.save(build_demo_model(), model)
        np.save(data, build_demo_data(48, seed=1))
        (tmp_path / "autocal_eval_mod.py").write_text(EVALUATOR)
        pipeline.write_text(json.dumps(PIPELINE))
    env = dict(os.environ, PYTHONPATH=str(tmp_path), SQNR_TARGET=str(target), EVAL_SLEEP="0.4", FLOAT_MODEL=str(model))
    return subprocess.Popen([sys.executable, "-m", "amct_pipeline", "--no-plugins", "run", str(pipeline),
                             "--model", str(model), "--data", f"calib={data}", "-o", str(out), "-q"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_and_restart_give_the_same_answer(session, tmp_path):
    target = _global_sqnr(session) + 5
    reference = _cli(tmp_path, tmp_path / "ref", target)
    assert reference.wait(300) == 0, reference.stderr.read()
    killed = _cli(tmp_path, tmp_path / "run", target)
    state = tmp_path / "run" / ".amct-autocal-demo" / "state.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and killed.poll() is None:
        if state.is_file() and len(json.loads(state.read_text() or "{}").get("evaluations", {})) >= 2:
            break
        time.sleep(0.05)
    assert killed.poll() is None, "the run ended before it could be killed"
    os.kill(killed.pid, signal.SIGKILL)       # our own child, by pid
    killed.wait()
    assert len(json.loads(state.read_text())["evaluations"]) >= 2
    restarted = _cli(tmp_path, tmp_path / "run", target)
    assert restarted.wait(300) == 0, restarted.stderr.read()
    name = "accuracy_based_auto_calibration_final_config.json"
    assert (tmp_path / "run" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    record = json.loads((tmp_path / "run" / "accuracy_based_auto_calibration_record.json").read_text())
    assert record["resumed_evaluations"] >= 2 and reference_record_evaluations(tmp_path) > 2
    reference_record = json.loads((tmp_path / "ref" / "accuracy_based_auto_calibration_record.json").read_text())
    assert record["result"] == reference_record["result"]


def reference_record_evaluations(tmp_path: Path) -> int:
    return json.loads((tmp_path / "ref" / "accuracy_based_auto_calibration_record.json").read_text())["evaluations"]
