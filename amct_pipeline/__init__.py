"""amct-pipeline: a plugin-based compression pipeline for ONNX models (AMCT-compatible).

Importing this package does nothing but define names: onnxruntime, tensorly and plugins are
loaded only when used.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "Session", "Pass", "PassResult", "PassContext", "Options", "Pipeline", "PipelineResult",
    "load_pipeline", "hookimpl", "instruments", "AmctError", "ConfigError", "PassError", "run",
    "__version__",
]

_LAZY = {
    "Session": "amct_pipeline.session",
    "Pass": "amct_pipeline.passes.base",
    "PassResult": "amct_pipeline.passes.base",
    "PassContext": "amct_pipeline.passes.base",
    "Options": "amct_pipeline.options",
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


def run(model: Any, pipeline: Any, **kwargs: Any):
    """One-shot helper: a fresh hermetic-by-choice Session runs ``pipeline`` on ``model``."""
    from .session import Session
    session = Session(load_entrypoints=kwargs.pop("load_entrypoints", None))
    return session.run(model, pipeline, **kwargs)
