"""amct-pipeline: a plugin-based compression pipeline for ONNX models (AMCT-compatible).

Importing this package does nothing but define names: onnxruntime, tensorly and plugins are
loaded only when used.

The public API is what this module names. A plugin implements ``Pass`` (with ``PassResult``,
``Options``) or one of the algorithm bases ``ActivationCalibrator`` (returning ``ActQuantParams``),
``WeightQuantizer`` (``WeightQuantParams``), ``DecompositionMethod`` or ``LoweringTarget``
(``LoweringContext``; ``PlanTarget`` when it rewrites the float graph from the lowering plan), and registers it with ``hookimpl`` (see README, "Design").
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "Session", "Pass", "PassResult", "PassContext", "Options", "Pipeline", "PipelineResult",
    "ActivationCalibrator", "ActQuantParams", "WeightQuantizer", "WeightQuantParams", "DecompositionMethod",
    "LoweringTarget", "PlanTarget", "LoweringContext", "PassInstrument",
    "load_pipeline", "hookimpl", "instruments", "AmctError", "ConfigError", "PassError", "run",
    "__version__",
]

_LAZY = {
    "Session": "amct_pipeline.session",
    "Pass": "amct_pipeline.passes.base",
    "PassResult": "amct_pipeline.passes.base",
    "PassContext": "amct_pipeline.passes.base",
    "Options": "amct_pipeline.options",
    "ActivationCalibrator": "amct_pipeline.algorithms.base",
    "ActQuantParams": "amct_pipeline.algorithms.base",
    "WeightQuantizer": "amct_pipeline.algorithms.base",
    "WeightQuantParams": "amct_pipeline.algorithms.base",
    "DecompositionMethod": "amct_pipeline.algorithms.base",
    "LoweringTarget": "amct_pipeline.algorithms.base",
    "LoweringContext": "amct_pipeline.algorithms.base",
    "PlanTarget": "amct_pipeline.algorithms.targets.base",
    "PassInstrument": "amct_pipeline.pipeline.instruments",
    "Pipeline": "amct_pipeline.pipeline.manager",
    "PipelineResult": "amct_pipeline.pipeline.manager",
    "load_pipeline": "amct_pipeline.pipeline.loader",
    "hookimpl": "amct_pipeline.plugins",
    "AmctError": "amct_pipeline.errors",
    "ConfigError": "amct_pipeline.errors",
    "PassError": "amct_pipeline.errors",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name == "instruments":
        return importlib.import_module("amct_pipeline.pipeline.instruments")
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version
        try:
            return version("amct-pipeline")
        except PackageNotFoundError:
            return "0+unknown"
    raise AttributeError(f"module 'amct_pipeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def run(model: Any, pipeline: Any, **kwargs: Any):
    """One-shot helper: a fresh hermetic-by-choice Session runs ``pipeline`` on ``model``."""
    from .session import Session
    session = Session(load_entrypoints=kwargs.pop("load_entrypoints", None))
    return session.run(model, pipeline, **kwargs)
