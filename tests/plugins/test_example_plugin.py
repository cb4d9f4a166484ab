"""The example third-party distribution: listed when installed, absent with autoload off, runs."""
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import numpy as np
import pytest

from amct_pipeline.demo import build_demo_data, build_demo_model

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = ROOT / "plugins" / "amct-pipeline-example" / "pipelines" / "example.yaml"

try:
    distribution("amct-pipeline-example")
except PackageNotFoundError:  # CI installs it (see .ci/run); a bare checkout may not
    pytest.skip("amct-pipeline-example is not installed (pip install ./plugins/amct-pipeline-example)",
                allow_module_level=True)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "amct_pipeline", *map(str, args)], capture_output=True, text=True)


def test_listed_when_installed_and_absent_with_autoload_off():
    listed = cli("list")
    assert "strip_identity" in listed.stdout and "absmax" in listed.stdout
    plugins = cli("list", "plugins").stdout
    assert "example" in plugins and "amct-pipeline-example" in plugins
    hidden = cli("--no-plugins", "list")
    assert hidden.returncode == 0 and "strip_identity" not in hidden.stdout and "absmax" not in hidden.stdout
    blocked = cli("list", "passes", "--block-plugin", "example")
    assert "strip_identity" not in blocked.stdout


def test_pipeline_using_both_runs(tmp_path):
    model, data = tmp_path / "m.onnx", tmp_path / "calib.npy"
    model.write_bytes(build_demo_model().SerializeToString())
    np.save(data, build_demo_data(16))
    done = cli("run", PIPELINE, "--model", model, "--data", f"calib={data}", "-o", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "m_example.onnx").exists()
    assert "calibrate" in done.stderr and "algorithm=absmax" in done.stderr


def test_without_the_plugin_the_pipeline_fails_validation():
    done = cli("--no-plugins", "validate", PIPELINE)
    assert done.returncode == 1
    assert "unknown pass 'strip_identity'" in done.stderr and "unknown calibrator 'absmax'" in done.stderr
