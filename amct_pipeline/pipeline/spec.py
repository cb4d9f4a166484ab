"""The pipeline schema (version 1). YAML, JSON, TOML and the textual form all load into it."""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import Field

from ..options import Options
from ..runtime.spec import DatasetSpec, Preprocess     # the data readers' schema, re-exported here

__all__ = ["SCHEMA_VERSION", "Preprocess", "DatasetSpec", "PassSpec", "ContextSpec", "ModelSpec", "PipelineSpec"]

SCHEMA_VERSION = 1


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
