"""The amct_onnx functions: AMCT's names, arguments, defaults and files; each one pipeline run.

| AMCT call | passes |
|---|---|
| ``create_quant_config`` | ``fuse_bn,match_layers`` (+ the .cfg read by both), then AMCT's JSON config |
| ``quantize_preprocess`` | ``fuse_bn,match_layers``; taps on the DMQ layers' inputs |
| its loop with ``AMCT_SO`` | ``fuse_bn,match_layers,dmq_balance`` fed by the taps: ``tensor_balance_factor`` |
| ``quantize_model`` | ``fuse_bn,match_layers[,dmq_balance{record}],quantize_weights{arq}``; taps on the layer inputs |
| its loop with ``AMCT_SO`` | ``fuse_bn,match_layers[,dmq_balance{record}],calibrate{ifmr},quantize_weights{arq},lower`` fed by the taps (``_calibration``) |
| ``save_model`` | ``fuse_bn,match_layers,load_record,lower{targets=[fakequant,ascend]}`` |
| ``convert_qat_model`` | ``convert_qat,lower{targets=[fakequant,ascend]}`` |
| ``accuracy_based_auto_calibration`` | ``fuse_bn,match_layers,auto_calibrate,lower`` (the sensitivity work's pass) |

Errors are this package's one-line errors (``amct_pipeline.errors``), a failing pass's own message
rather than the pipeline's "passes[i] failed" frame.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from ._common import CALIBRATION_METADATA_KEY, api_error, hermetic_session, run_passes

__all__ = ["create_quant_config", "quantize_model", "save_model", "convert_qat_model",
           "accuracy_based_auto_calibration", "quantize_preprocess", "evaluator_base", "model_path", "DEPLOY_TARGETS"]

DEPLOY_TARGETS = ["fakequant", "ascend"]            # AMCT's two models
ASCEND_OPTIONS = {"ascend": {"domain": "", "quant_convention": "amct"}}   # as preset ptq_int8_ascend


def _argument(function: str, name: str, message: str):
    return api_error(function, f"argument {name}: {message}")


def _existing_file(function: str, name: str, path: Any, kind: str) -> str:
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise _argument(function, name, f"expected a path to {kind}, got {path!r}")
    if not os.path.isfile(path):
        raise _argument(function, name, f"no such file '{path}'; give {kind}")
    return os.fspath(path)


def _output_file(function: str, name: str, path: Any, kind: str) -> str:
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise _argument(function, name, f"expected a path for {kind}, got {path!r}")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise _argument(function, name, f"'{path}' is a folder; give a file name for {kind}")
    return path


def _config_options(config_file: str) -> dict[str, Any]:
    return {"amct_config": os.path.abspath(config_file)}


def _save_prefix(function: str, save_path: Any) -> tuple[str, str]:
    """AMCT's save_path: '<folder>/<prefix>' (folder '.' when bare; prefix '' when it ends in '/')."""
    if not isinstance(save_path, (str, os.PathLike)) or not str(save_path):
        raise _argument(function, "save_path", f"expected a path prefix such as './results/model', got {save_path!r}")
    text = os.fspath(save_path)
    folder, prefix = os.path.split(text)
    return folder or ".", prefix


def model_path(folder: str, prefix: str, suffix: str) -> str:
    """The file lower writes for a target of ``suffix`` (AMCT's naming: <prefix>_<suffix>.onnx)."""
    from ..passes.lower import model_filename
    return os.path.join(folder, model_filename(prefix, suffix))


# -- create_quant_config ------------------------------------------------------------------------
def create_quant_config(config_file, model_file, skip_layers=None, batch_num=1, activation_offset=True,
                        config_defination=None) -> None:
    """Write AMCT's JSON quant config listing every quantizable layer of ``model_file`` (after BN
    fusion). With ``config_defination`` (a simplified .cfg) its settings are used and
    ``skip_layers``/``batch_num``/``activation_offset`` are ignored, as in AMCT."""
    from ..amct import ConfigFileError, write_quant_config
    from ..amct import create_quant_config as make_config
    from ..errors import ConfigError, Problem
    where = "create_quant_config"
    config_file = _output_file(where, "config_file", config_file, "the quant config (.json)")
    model_file = _existing_file(where, "model_file", model_file, "an .onnx model")
    if config_defination is not None:
        cfg = _existing_file(where, "config_defination", config_defination, "a simplified config (.cfg)")
        result = run_passes([("fuse_bn", _config_options(cfg)), ("match_layers", _config_options(cfg))], model_file)
        write_quant_config(result.artifacts["amct_config"], config_file)
        return
    if isinstance(batch_num, bool) or not isinstance(batch_num, int) or batch_num < 1:
        raise _argument(where, "batch_num", f"must be an integer > 0, got {batch_num!r}")
    if not isinstance(activation_offset, bool):
        raise _argument(where, "activation_offset", f"must be True or False, got {activation_offset!r}")
    skip = list(skip_layers or [])
    layer_map = run_passes([("fuse_bn", {}), ("match_layers", {})], model_file).artifacts["layer_map"]
    try:
        data = make_config([(layer.name, layer.op_type) for layer in layer_map.layers()], skip_layers=skip,
                           batch_num=batch_num, activation_offset=activation_offset)
    except ConfigFileError as exc:
        raise ConfigError([Problem(where, i.where, i.message) for i in exc.issues]) from None
    write_quant_config(data, config_file)


# -- quantize_model / quantize_preprocess -------------------------------------------------------
def quantize_model(config_file, model_file, modified_onnx_file, record_file) -> None:
    """BN fusion and weight quantization; write the modified (calibration) model and a record holding
    the weights' factors. Run the modified model in onnxruntime with ``AMCT_SO`` for ``batch_num``
    batches: the record then gets the activation factors, and ``save_model`` can run. A record that
    ``quantize_preprocess``'s calibration filled carries DMQ factors: they are applied first."""
    _write_modified("quantize_model", "quantize", config_file, model_file, modified_onnx_file, record_file)


def quantize_preprocess(config_file, record_file, model_file, modified_onnx_file) -> None:
    """AMCT's DMQ balancing (SPEC 4.7) before ``quantize_model``: write a modified model whose run with
    ``AMCT_SO`` for ``batch_num`` batches measures the balance factors of every layer the config gives
    a ``dmq_balancer_param`` (``dmq_balance`` pass) and writes them to ``record_file``
    (``tensor_balance_factor``); then ``quantize_model`` with that record applies them."""
    _write_modified("quantize_preprocess", "dmq", config_file, model_file, modified_onnx_file, record_file)


def _write_modified(where: str, kind: str, config_file, model_file, modified_onnx_file, record_file, *,
                    keep_inputs: bool = False) -> None:
    from ..amct import write_record
    from ..ir import write_model
    from ._calibration import CalibrationSpec, add_taps, balance_record, forget, initial_record
    config_file = _existing_file(where, "config_file", config_file, "the quant config from create_quant_config")
    model_file = _existing_file(where, "model_file", model_file, "an .onnx model")
    modified_onnx_file = _output_file(where, "modified_onnx_file", modified_onnx_file, "the modified model (.onnx)")
    record_file = _output_file(where, "record_file", record_file, "the record (.txt)")
    if os.path.abspath(modified_onnx_file) == os.path.abspath(model_file):
        raise _argument(where, "modified_onnx_file", "is the input model; writing it would destroy the model")
    spec = CalibrationSpec(kind=kind, model=os.path.abspath(model_file), config=os.path.abspath(config_file),
                           record=os.path.abspath(record_file), batch_num=1,
                           balanced=kind == "quantize" and balance_record(record_file), keep_inputs=keep_inputs)
    prepared = run_passes(spec.prepare_passes(), model_file)
    spec = spec.with_layers(prepared, where)
    graph = prepared.graph
    add_taps(graph, spec)
    graph.meta.metadata[CALIBRATION_METADATA_KEY] = spec.to_json()
    forget(spec.record)               # a new quantize_model starts a new calibration
    write_model(graph, Path(modified_onnx_file))
    write_record(initial_record(spec, prepared.artifacts), record_file)


# -- save_model ---------------------------------------------------------------------------------
def save_model(modified_onnx_file, record_file, save_path) -> None:
    """Write ``<save_path>_fake_quant_model.onnx`` and ``<save_path>_deploy_model.onnx`` from the
    calibrated record (``load_record`` on quantize_model's BN-fused model, then ``lower``)."""
    from ._calibration import check_finished, read_spec
    where = "save_model"
    modified_onnx_file = _existing_file(where, "modified_onnx_file", modified_onnx_file,
                                        "the modified model written by quantize_model")
    record_file = _existing_file(where, "record_file", record_file, "the record written by calibration")
    folder, prefix = _save_prefix(where, save_path)
    spec = read_spec(modified_onnx_file, where)
    check_finished(spec, record_file, modified_onnx_file)
    config = _config_options(spec.config)
    passes = [("fuse_bn", config), ("match_layers", config), ("load_record", {"path": os.path.abspath(record_file)}),
              ("lower", {"targets": DEPLOY_TARGETS, "prefix": prefix, "target_options": ASCEND_OPTIONS})]
    run_passes(passes, spec.model, output_dir=folder)


# -- convert_qat_model --------------------------------------------------------------------------
def convert_qat_model(model_file, save_path, record_file=None) -> None:
    """A QuantizeLinear/DequantizeLinear (QAT) model to AMCT's fake-quant and deploy models (and the
    record, when ``record_file`` is given)."""
    from ..amct import write_record
    where = "convert_qat_model"
    model_file = _existing_file(where, "model_file", model_file, "a QDQ (QAT) .onnx model")
    folder, prefix = _save_prefix(where, save_path)
    if record_file is not None:
        record_file = _output_file(where, "record_file", record_file, "the record (.txt)")
    result = run_passes([("convert_qat", {}), ("lower", {"targets": DEPLOY_TARGETS, "prefix": prefix,
                                                   "target_options": ASCEND_OPTIONS})],
                  model_file, output_dir=folder)
    if record_file is not None:
        write_record(result.artifacts["quant_record"], record_file)


# -- accuracy-based auto calibration (the sensitivity work's pass) ----------------------------------
def _require_pass(function: str, name: str, issue: str) -> None:
    if name not in hermetic_session().registry("passes"):
        raise api_error(function, f"needs the '{name}' pass ({issue}), which this installation does not have")


def evaluator_base():
    """AMCT's AutoCalibrationEvaluatorBase (the sensitivity work's ``algorithms.autocal``)."""
    try:
        from ..algorithms.autocal import AutoCalibrationEvaluatorBase
    except ImportError:
        raise api_error("AutoCalibrationEvaluatorBase", "needs amct_pipeline.algorithms.autocal (the auto "
                          "calibration work), which this installation does not have") from None
    return AutoCalibrationEvaluatorBase


def accuracy_based_auto_calibration(model_file, model_evaluator, config_file, record_file, save_dir,
                                    strategy='BinarySearch', sensitivity='CosineSimilarity') -> None:
    """AMCT's accuracy-based auto calibration (SPEC 8.1): ``quantize_model``, then
    ``model_evaluator.calibration(modified_model)`` runs the user's calibration loop (the record is
    written, and the batches' model inputs are kept for the ranking run, as AMCT dumps them), then
    ``fuse_bn,match_layers,load_record,auto_calibrate`` rolls back the most sensitive layers until
    ``metric_eval`` accepts ``evaluate``'s metric. Writes ``<save_dir>_fake_quant_model.onnx``,
    ``<save_dir>_deploy_model.onnx`` and AMCT's three ``accuracy_based_auto_calibration_*`` files
    beside them; ``record_file`` holds the calibration of every layer."""
    from ._calibration import check_finished, kept_inputs, read_spec
    where = "accuracy_based_auto_calibration"
    _require_pass(where, "auto_calibrate", "auto calibration")
    for method in ("calibration", "evaluate", "metric_eval"):
        if not callable(getattr(model_evaluator, method, None)):
            raise _argument(where, "model_evaluator", f"has no method {method}(); subclass "
                            "AutoCalibrationEvaluatorBase and implement calibration, evaluate and metric_eval")
    folder, prefix = _save_prefix(where, save_dir)
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".amct-autocal-", dir=folder) as temp:
        modified = os.path.join(temp, "modified_model.onnx")
        _write_modified(where, "quantize", config_file, model_file, modified, record_file, keep_inputs=True)
        model_evaluator.calibration(modified)
        spec = read_spec(modified, where)
        check_finished(spec, record_file, modified, where)
        batches = kept_inputs(spec.record)
    options = {"evaluator": model_evaluator, "strategy": strategy, "sensitivity": sensitivity, "prefix": prefix,
               "targets": DEPLOY_TARGETS}
    run_passes([("fuse_bn", _config_options(config_file)), ("match_layers", _config_options(config_file)),
                ("load_record", {"path": os.path.abspath(record_file)}), ("auto_calibrate", options)],
               model_file, datasets={"calib": batches}, output_dir=folder)
