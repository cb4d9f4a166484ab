"""The built-in passes, algorithms, readers and presets, registered through the public hooks."""
from __future__ import annotations

from pathlib import Path

from . import hookimpl

PIPELINES_DIR = Path(__file__).resolve().parent.parent / "pipelines"


@hookimpl
def amct_register_passes():
    from ..passes.fuse_bn import FuseBatchNormPass
    from ..passes.match_layers import MatchLayersPass
    from ..passes.save import SavePass
    from ..passes.decompose import DecomposePass
    from ..passes.apply_decomposition import ApplyDecompositionPass
    from ..passes.calibrate import CalibratePass
    from ..passes.refine_ranges import RefineRangesPass
    from ..passes.quantize_weights import QuantizeWeightsPass
    from ..passes.lower import LowerPass
    from ..passes.amct_files import ExportAmctPass, LoadRecordPass
    from ..passes.convert_qat import ConvertQatPass
    from ..passes.equalize import EqualizeChannelsPass
    from ..passes.dmq_balance import DmqBalancePass
    from ..passes.analyze import AnalyzePass
    from ..passes.auto_calibrate import AutoCalibratePass
    from ..passes.mixed_precision import MixedPrecisionPass
    from ..passes.retrain import RetrainPass
    return [FuseBatchNormPass, MatchLayersPass, SavePass, CalibratePass, RefineRangesPass, DecomposePass, ApplyDecompositionPass,
            QuantizeWeightsPass, LowerPass, ExportAmctPass, LoadRecordPass, ConvertQatPass, EqualizeChannelsPass,
            DmqBalancePass, AnalyzePass, AutoCalibratePass, MixedPrecisionPass, RetrainPass]


@hookimpl
def amct_register_calibrators():
    from ..algorithms.calibration import BUILTIN_CALIBRATORS
    return list(BUILTIN_CALIBRATORS)


@hookimpl
def amct_register_weight_quantizers():
    from ..algorithms.weights import BUILTIN_WEIGHT_QUANTIZERS
    return list(BUILTIN_WEIGHT_QUANTIZERS)


@hookimpl
def amct_register_targets():
    from ..algorithms.targets import BUILTIN_TARGETS
    from ..ascend.target import AscendTarget
    return list(BUILTIN_TARGETS) + ([AscendTarget] if AscendTarget not in BUILTIN_TARGETS else [])


@hookimpl
def amct_register_data_readers():
    from ..runtime.data import NpyReader, PythonReader
    return [NpyReader, PythonReader]


@hookimpl
def amct_register_pipelines():
    """Every YAML file shipped in the package's pipelines folder, by file stem."""
    return {p.stem: str(p) for p in sorted(PIPELINES_DIR.glob("*.yaml"))}


@hookimpl
def amct_register_decompositions():
    from ..algorithms.decomposition import BUILTIN_DECOMPOSITIONS
    return list(BUILTIN_DECOMPOSITIONS)
