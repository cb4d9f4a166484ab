"""Options whose cost grows with their value are bounded in their schemas."""
from __future__ import annotations

import json
import time
import typing

import numpy as np
import pytest

import amct_pipeline.algorithms.calibration.entropy as entropy
from amct_pipeline.demo import build_demo_data, build_demo_model
from amct_pipeline.session import Session
from sec_helpers import one_error, run_cli, save_model

COSTLY = ("num_", "n_iter", "bins", "step", "batch", "samples", "sweeps", "patience", "factors", "targets", "count",
          "iter", "rounds", "size")
# bounded by the data (a value past the data reads what exists or is an error, it costs nothing more),
# by a cross-field validator, or costing nothing more as they grow
DATA_BOUNDED = {"batch_num", "num_batches", "max_batches", "max_samples", "samples_per_image", "num_bits",
                "targets",              # lower: distinct registered target names
                "patience",             # refine_ranges: stops sooner, never later; factors is bounded
                "num_quantized_bins",   # entropy: <= num_bins and (candidates x bins) <= MAX_SEARCH_WORK
                "search_step"}          # ifmr: (end - start) / step <= MAX_SEARCH_CANDIDATES
KNOWN_UNBOUNDED: set[tuple[str, str, str]] = set()


def _bounded(field) -> bool:
    meta = {type(m).__name__ for m in field.metadata}
    if meta & {"Le", "Lt", "MaxLen", "Interval"} or getattr(field, "max_length", None):
        return True
    args = typing.get_args(field.annotation) or (field.annotation,)
    return all(typing.get_origin(a) is typing.Literal or a in (bool, type(None)) for a in args)


def test_every_costly_option_is_bounded_or_data_bounded():
    session = Session(load_entrypoints=False)
    loose = []
    for kind, registry in session.registries.items():
        for entry in registry:
            options = getattr(entry.obj, "Options", None)
            for name, field in getattr(options, "model_fields", {}).items():
                if not any(word in name for word in COSTLY) or name in DATA_BOUNDED:
                    continue
                origin = typing.get_origin(field.annotation)
                numeric = field.annotation in (int, float) or origin in (list, typing.Union)
                if numeric and not _bounded(field) and (kind, entry.name, name) not in KNOWN_UNBOUNDED:
                    loose.append(f"{kind}:{entry.name}.{name}")
    assert not loose, f"options whose cost grows with their value need a bound: {loose}"


@pytest.mark.parametrize("text, expected", [
    ("calibrate{algorithm=ifmr,algorithm_options={search_step=2e-9}}", "at most 10000"),
    ("calibrate{algorithm=ifmr,algorithm_options={search_range_start=0.5,search_range_end=1e6,search_step=0.01}}",
     "at most 10000"),
    ("calibrate{algorithm=entropy,algorithm_options={num_bins=65536,num_bits=16}}", "at most 6.71e+07"),
    ("decompose{method=cp,method_options={n_iter_max=100000000}}", "less than or equal to 10000"),
    ("refine_ranges{factors=[" + ",".join(["0.5"] * 101) + "]}", "at most 100 items"),
])
def test_costly_values_are_refused_when_validating(capsys, text, expected):
    start = time.perf_counter()
    code, err = run_cli(capsys, "validate", "match_layers," + text)
    assert time.perf_counter() - start < 5
    assert code == 1 and any(expected in line and "passes[1].options" in line for line in err), err


def test_search_step_from_an_amct_config_is_bounded(capsys, tmp_path):
    model = save_model(build_demo_model(), tmp_path / "demo.onnx")
    data = tmp_path / "calib.npy"
    np.save(data, build_demo_data(16))
    config = tmp_path / "q.json"
    assert run_cli(capsys, "config", "create", "--model", model, "-o", config)[0] == 0
    content = json.loads(config.read_text())
    for value in content.values():
        if isinstance(value, dict) and "activation_quant_params" in value:
            value["activation_quant_params"]["search_step"] = 2e-9
    config.write_text(json.dumps(content))
    start = time.perf_counter()
    line = one_error(capsys, "run", f"fuse_bn,match_layers{{amct_config={config}}},calibrate,quantize_weights,lower",
                     "--model", model, "--data", f"calib={data}", "-o", tmp_path / "out", "-q")
    assert time.perf_counter() - start < 10
    assert "search_step 2e-09" in line and "layer 'conv1'" in line and not (tmp_path / "out").exists()


def test_chunked_kl_search_is_identical(monkeypatch):
    for bins, quantized in ((2048, 128), (2048, 256), (513, 2), (2048, 2048)):
        rng = np.random.default_rng(bins + quantized)
        hist = rng.random(bins) * (rng.random(bins) > 0.3)
        monkeypatch.setattr(entropy, "CHUNK_WORK", 1 << 40)
        whole = entropy.kl_divergences(hist, quantized)
        monkeypatch.setattr(entropy, "CHUNK_WORK", 1 << 10)
        chunked = entropy.kl_divergences(hist, quantized)
        assert np.array_equal(whole[0], chunked[0]) and np.array_equal(whole[1], chunked[1])
