"""AMCT's ``amct_onnx.common.auto_calibration``: the evaluator base class users subclass."""
from __future__ import annotations

def __getattr__(name: str):
    if name == "AutoCalibrationEvaluatorBase":
        from .._api import evaluator_base
        return evaluator_base()
    raise AttributeError(f"module 'amct_pipeline.amct_onnx.common.auto_calibration' has no attribute '{name}'")
