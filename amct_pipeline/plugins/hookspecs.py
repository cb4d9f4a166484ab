"""The hooks a plugin implements. Each returns a list (or mapping) of contributions.

Registration hooks are plain 1:N hooks: every plugin's answer is collected, none is dropped,
and a name two plugins both claim is an error naming both.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import pluggy

from . import PROJECT

if TYPE_CHECKING:
    from ..algorithms.base import ActivationCalibrator, DecompositionMethod, LoweringTarget, WeightQuantizer
    from ..passes.base import Pass
    from ..runtime.data import DataReader

hookspec = pluggy.HookspecMarker(PROJECT)


@hookspec
def amct_register_passes() -> "list[type[Pass]]":
    """Pass classes (subclasses of ``amct_pipeline.Pass``) this plugin adds."""


@hookspec
def amct_register_calibrators() -> "list[type[ActivationCalibrator]]":
    """Activation calibrators, selected by ``calibrate{algorithm=NAME}``."""


@hookspec
def amct_register_weight_quantizers() -> "list[type[WeightQuantizer]]":
    """Weight quantizers, selected by ``quantize_weights{algorithm=NAME}``."""


@hookspec
def amct_register_decompositions() -> "list[type[DecompositionMethod]]":
    """Tensor decomposition methods, selected by ``decompose{method=NAME}``."""


@hookspec
def amct_register_targets() -> "list[type[LoweringTarget]]":
    """Lowering targets, selected by ``lower{target=NAME}``."""


@hookspec
def amct_register_data_readers() -> "list[type[DataReader]]":
    """Data readers, selected by a dataset's ``reader``."""


@hookspec
def amct_register_pipelines() -> "Mapping[str, Any]":
    """Named pipeline presets: name -> pipeline file path or pipeline mapping."""
