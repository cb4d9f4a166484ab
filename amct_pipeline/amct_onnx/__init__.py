"""AMCT's ``amct_onnx`` Python API over the pipeline's passes: migrate a script by changing its import.

    import amct_pipeline.amct_onnx as amct      # was: import amct_onnx as amct

``create_quant_config`` -> ``quantize_model`` -> the user's onnxruntime loop over the modified model
with ``amct.AMCT_SO`` (``batch_num`` batches stream into the calibrators; the record is written after
the last) -> ``save_model`` (``<prefix>_fake_quant_model.onnx``, ``<prefix>_deploy_model.onnx``);
``convert_qat_model``, ``accuracy_based_auto_calibration``, ``quantize_preprocess``. Each runs a
pipeline of the same passes ``amct-pipeline run`` uses (see ``_api.py`` for which).

Importing this module loads nothing heavy; ``AMCT_SO`` (an ``onnxruntime.SessionOptions`` that runs
the calibration operators) is made on first use.
"""
from __future__ import annotations

from ._api import (
    accuracy_based_auto_calibration, convert_qat_model, create_quant_config, quantize_model, quantize_preprocess,
    save_model,
)

__all__ = ["create_quant_config", "quantize_model", "save_model", "accuracy_based_auto_calibration",
           "convert_qat_model", "quantize_preprocess", "AMCT_SO"]


def __getattr__(name: str):
    if name == "AMCT_SO":      # made once, on first use: it registers the calibration operator
        from ._calibration import session_options
        globals()["AMCT_SO"] = options = session_options()
        return options
    raise AttributeError(f"module 'amct_pipeline.amct_onnx' has no attribute '{name}'")
