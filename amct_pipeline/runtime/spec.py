"""What a dataset is: the options the data readers read (the pipeline schema's ``datasets`` entries)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, PositiveInt

from ..options import Options

__all__ = ["Preprocess", "DatasetSpec"]


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
