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
    return [FuseBatchNormPass, MatchLayersPass, SavePass]


@hookimpl
def amct_register_data_readers():
    from ..runtime.data import NpyReader, PythonReader
    return [NpyReader, PythonReader]


@hookimpl
def amct_register_pipelines():
    """Every YAML file shipped in the package's pipelines folder, by file stem."""
    return {p.stem: str(p) for p in sorted(PIPELINES_DIR.glob("*.yaml"))}
