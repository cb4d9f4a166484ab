"""The pipeline schema (version 1). YAML, JSON, TOML and the textual form all load into it."""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import Field, PositiveInt

from ..options import Options

__all__ = ["SCHEMA_VERSION", "Preprocess", "DatasetSpec", "PassSpec", "ContextSpec", "ModelSpec", "PipelineSpec"]

SCHEMA_VERSION = 1


class Preprocess(Options):
    """Simple preprocessing applied by the data readers, in this order."""

    layout: Literal["nchw", "nhwc_to_nchw"] = Field("nchw", description="Transpose NHWC arrays to NCHW.")
    dtype: Literal["float32", "float16", "int64", "int32", "uint8", "int8"] = Field(
        "float32", description="Cast to this dtype before scaling.")
    scale: float = Field(1.0, description="Multiply by this factor (e.g. 1/255).")
    mean: Optional[list[float]] = Field(None, description="Per-channel mean subtracted after scaling.")
    std: Optional[list[float]] = Field(None, description="Per-channel std divided after the mean.")
    add_channel_axis: bool = Field(False, description="Insert a channel axis at 1 ([N,H,W] -> [N,1,H,W]).")


class DatasetSpec(Options):
    """A named dataset that passes refer to by name."""

    reader: str = Field("npy", description="Data reader name (see `amct-pipeline list readers`).")
    path: Optional[str] = Field(None, description="File or directory; relative to the pipeline file.")
    key: Optional[str] = Field(None, description="Array name inside an .npz (default: the only or first array).")
    inputs: Optional[dict[str, str]] = Field(None, description="Model input name -> array name in an .npz.")
    batch_size: PositiveInt = Field(1, description="Samples per batch (a fixed model batch dimension wins).")
    num_batches: Optional[PositiveInt] = Field(None, description="Batches to read; default: all samples.")
    start: int = Field(0, ge=0, description="Index of the first sample used.")
    count: Optional[PositiveInt] = Field(None, description="Samples used from `start`; default: the rest.")
    preprocess: Optional[Preprocess] = None


class PassSpec(Options):
    """One step of a pipeline: a registered pass and its options."""

    name: str = Field(alias="pass", description="Registered pass name.")
    options: dict[str, Any] = Field(default_factory=dict)


class ContextSpec(Options):
    verify_each: Union[bool, Literal["full"]] = Field(
        True, description="Verify the graph after each modifying pass; 'full' adds onnx.checker.")
    seed: int = Field(0, description="Seed for every random choice a pass makes.")


class ModelSpec(Options):
    input: Optional[str] = Field(None, description="Model path; the CLI's --model overrides it.")


class PipelineSpec(Options):
    """A whole pipeline: ordered passes plus the datasets they read."""

    model_config = {**Options.model_config, "populate_by_name": True}

    schema_version: Literal[1] = SCHEMA_VERSION
    name: str = "pipeline"
    description: str = ""
    model: ModelSpec = Field(default_factory=ModelSpec)
    context: ContextSpec = Field(default_factory=ContextSpec)
    datasets: dict[str, DatasetSpec] = Field(default_factory=dict)
    passes: list[PassSpec] = Field(default_factory=list)
    source: str = Field("<dict>", exclude=True, description="Where it was loaded from (for messages).")
    base_dir: str = Field(".", exclude=True, description="Directory relative paths resolve against.")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_defaults=False, exclude={"source", "base_dir"})
