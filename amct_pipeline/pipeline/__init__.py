"""Pipelines as data: the versioned schema, the file loaders and the textual one-line form."""
from .loader import load_pipeline, apply_overrides
from .spec import DatasetSpec, PassSpec, PipelineSpec, Preprocess
from .textual import format_pipeline, parse_pipeline_text

__all__ = [
    "DatasetSpec", "PassSpec", "PipelineSpec", "Preprocess",
    "load_pipeline", "apply_overrides", "format_pipeline", "parse_pipeline_text",
]
